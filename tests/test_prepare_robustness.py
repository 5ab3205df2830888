"""`flip-data` against hostile and unlucky input: colliding keys, wrong CelebA headers, killed
workers and parents, two runs on one folder, and tables that used to slip through silently."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from flip.benchmarks.celeba import CELEBA_ATTRIBUTES
from flip.cli.data import main

from .helpers import flip_data_command, flip_data_env, read_shards

KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _jpeg(side: int = 16, colour: tuple[int, int, int] = (120, 80, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _folder(tmp_path: Path, rows: list[str], files: dict[str, bytes], table: str = "captions.csv"):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for name, data in files.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(data)
    captions = tmp_path / table
    captions.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return images, captions


# -- 1. keys ---------------------------------------------------------------------------------------


def test_keys_are_unique_for_distinct_names_and_stable_across_runs(tmp_path):
    names = ["张三.jpg", "李四.jpg", "a b.jpg", "a_b.jpg", "x/y.jpg", "x_y.jpg", "c.jpg", "c.png"]
    files = {name: _jpeg(colour=(10 * i, 50, 90)) for i, name in enumerate(names)}
    rows = ["file_name,caption", *[f"{name},photo {i}" for i, name in enumerate(names)]]
    images, captions = _folder(tmp_path, rows, files)
    keys = []
    for run in ("one", "two"):
        out = tmp_path / run
        assert (
            main(["folder", str(images), "--captions", str(captions), "-o", str(out), "--no-progress"]) == 0
        )
        report = json.loads((out / "report.json").read_text())
        assert report["samples"]["written"] == len(names) and report["skipped_by_reason"] == {}
        samples = read_shards(out)
        by_path = {json.loads(s["json"])["image_path"]: key for key, s in samples.items()}
        assert sorted(by_path) == sorted(names)
        assert all(KEY.match(key) for key in by_path.values()), by_path
        keys.append(by_path)
    assert keys[0] == keys[1]  # the same inputs give the same keys on every run
    assert keys[0]["a_b.jpg"] == "a_b" and keys[0]["a b.jpg"].startswith("a_b_")


# -- 2. CelebA header ------------------------------------------------------------------------------


def _celeba(root: Path, header: list[str]) -> None:
    (root / "img_align_celeba").mkdir(parents=True)
    lines = ["2", " ".join(header)]
    for i in (1, 2):
        name = f"{i:06d}.jpg"
        (root / "img_align_celeba" / name).write_bytes(_jpeg())
        lines.append(name + " " + " ".join(["1", "-1"][(i + j) % 2] for j in range(len(header))))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n")


@pytest.mark.parametrize(
    ("header", "named"),
    [
        ([f"attr{i}" for i in range(40)], r"missing 40: 5_o_Clock_Shadow.*unknown 40: attr0, attr1"),
        (list(CELEBA_ATTRIBUTES[:-1]), r"missing 1: Young"),
        ([*CELEBA_ATTRIBUTES[:-1], "Old"], r"missing 1: Young; unknown 1: Old"),
    ],
)
def test_flip_data_celeba_refuses_a_header_that_is_not_celebas_40_names(tmp_path, capsys, header, named):
    _celeba(tmp_path / "celeba", header)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["celeba", str(tmp_path / "celeba"), "--split", "all", "-o", str(out), "--no-progress"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "line 2: the header is not CelebA's 40 attribute names" in error and re.search(named, error)
    assert not out.exists()


# -- 3. worker failures ----------------------------------------------------------------------------


def _slow_folder(tmp_path: Path, count: int = 160) -> tuple[Path, Path]:
    """`count` large JPEGs (hard links of one file: no disk cost) that take a while to shrink."""
    images = tmp_path / "slow"
    images.mkdir()
    ramp = np.linspace(0, 255, 2400, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(ramp, (2400, 1)), np.tile(ramp[:, None], (1, 2400)), np.full((2400, 2400), 90)], -1
    )
    first = images / "0000.jpg"
    Image.fromarray(pixels.astype(np.uint8)).save(first, quality=90)
    for i in range(1, count):
        os.link(first, images / f"{i:04d}.jpg")
    captions = tmp_path / "slow.csv"
    captions.write_text("file_name,caption\n" + "".join(f"{i:04d}.jpg,face {i}\n" for i in range(count)))
    return images, captions


def _slow_args(images: Path, captions: Path, out: Path, workers: int = 2) -> list[str]:
    return flip_data_command(
        "folder", str(images), "--captions", str(captions), "-o", str(out), "--workers", str(workers),
        "--samples-per-shard", "4", "--resize-short-side", "32", "--no-progress",
    )  # fmt: skip


def _workers_of(process: subprocess.Popen, count: int, timeout: float = 60.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(process.pid).children()
        if len(children) >= count:
            return children
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError(f"flip-data did not start {count} workers in {timeout} s")


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # killed; only its exit status is left
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_workers_die_with_a_parent_killed_by_sigkill(tmp_path):
    images, captions = _slow_folder(tmp_path)
    parent = subprocess.Popen(
        _slow_args(images, captions, tmp_path / "out"),
        env=flip_data_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        workers = _workers_of(parent, 2)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [w.pid for w in workers if not _gone(w)]
        assert not alive, f"workers {alive} outlived their parent killed with SIGKILL"
    finally:
        for w in workers if "workers" in locals() else []:
            if not _gone(w):
                w.kill()
        if parent.poll() is None:
            parent.kill()
        parent.communicate()


@pytest.mark.slow
def test_a_worker_killed_mid_run_ends_the_run_promptly_and_a_rerun_completes_it(tmp_path):
    images, captions = _slow_folder(tmp_path)
    out = tmp_path / "out"
    run = subprocess.Popen(
        _slow_args(images, captions, out), env=flip_data_env(), stderr=subprocess.PIPE, text=True
    )
    try:
        workers = _workers_of(run, 2)
        deadline = time.monotonic() + 60
        while not list(out.glob("*_stats.json")) and time.monotonic() < deadline:
            time.sleep(0.02)
        workers[0].kill()  # what the kernel's OOM killer does
        started = time.monotonic()
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode != 0 and time.monotonic() - started < 30
    assert "Traceback" not in stderr and "BrokenProcessPool" not in stderr, stderr
    assert f"worker process {workers[0].pid} was killed by SIGKILL" in stderr, stderr
    assert "rerun the same command to resume" in stderr, stderr
    assert not list(out.glob("*_stats.json"))[40:], "the run went on after its worker died"

    rerun = subprocess.run(
        _slow_args(images, captions, out), env=flip_data_env(), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    reference = tmp_path / "reference"
    once = subprocess.run(
        _slow_args(images, captions, reference, workers=1),
        env=flip_data_env(),
        capture_output=True,
        timeout=300,
    )
    assert once.returncode == 0
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert shards == sorted(p.name for p in reference.glob("*.tar")) and len(shards) == 40
    for name in shards:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def _blocks_on_last(task: str) -> str:
    """A task for WorkerPool: 'last' announces its worker's pid and then never returns."""
    if task.startswith("last:"):
        Path(task[5:]).write_text(str(os.getpid()))
        time.sleep(120)
    return task.upper()


def test_a_worker_killed_while_the_last_task_is_in_flight_raises_at_once(tmp_path):
    from flip.data.workers import WorkerDied, WorkerPool

    marker = tmp_path / "pid"

    def kill_when_announced() -> None:
        while not marker.exists() or not marker.read_text():
            time.sleep(0.01)
        os.kill(int(marker.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_announced, daemon=True)
    killer.start()
    started = time.monotonic()
    results = []
    pool = WorkerPool(_blocks_on_last, 2)
    pids = pool.pids
    with (
        pytest.raises(WorkerDied, match=r"worker process \d+ was killed by SIGKILL while working on last:"),
        pool,
    ):
        for _task, result in pool.imap_unordered(["a", "b", f"last:{marker}"]):
            results.append(result)
    assert time.monotonic() - started < 20 and sorted(results) == ["A", "B"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(
        _gone(psutil.Process(p)) if psutil.pid_exists(p) else True for p in pids
    ):
        time.sleep(0.05)
    assert all(not psutil.pid_exists(p) or _gone(psutil.Process(p)) for p in pids)  # no worker left behind


# -- 4. two runs, one output folder ---------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_a_busy_output_folder_is_refused_naming_the_first(tmp_path):
    images, captions = _slow_folder(tmp_path)
    out = tmp_path / "out"
    first = subprocess.Popen(
        _slow_args(images, captions, out), env=flip_data_env(), stderr=subprocess.PIPE, text=True
    )
    try:
        _workers_of(first, 2)
        second = subprocess.run(
            _slow_args(images, captions, out),
            env=flip_data_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.poll() is None, "the first run ended before the second was tried"
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert second.returncode == 2, second.stderr
    assert f"is in use by pid {first.pid} on host {os.uname().nodename}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, first_err
    report = json.loads((out / "report.json").read_text())
    assert report["samples"]["written"] == 160 and len(list(out.glob("*.tar"))) == 40


# -- 5. weak messages and silent surprises ---------------------------------------------------------


def _run_folder(images: Path, captions: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    try:
        code = main(
            ["folder", str(images), "--captions", str(captions), "-o", str(out), "--no-progress", *extra]
        )
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_missing_captions_file_or_column_fails_before_creating_the_output(tmp_path, capsys):
    images, captions = _folder(tmp_path, ["file_name,text", "a.jpg,hello"], {"a.jpg": _jpeg()})
    out = tmp_path / "out"
    code, err = _run_folder(images, tmp_path / "nope.csv", out, capsys)
    assert code == 2 and "captions file" in err and "nope.csv' does not exist" in err
    code, err = _run_folder(images, captions, out, capsys, "--caption-column", "caption")
    assert code == 2 and "no caption column 'caption'; the file has columns 'file_name', 'text'" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("table", ["empty.csv", "header_only.csv", "empty.jsonl"])
def test_an_empty_captions_table_is_an_error(tmp_path, capsys, table):
    images, _ = _folder(tmp_path, ["x"], {"a.jpg": _jpeg()})
    captions = tmp_path / table
    captions.write_text("file_name,caption\n" if table == "header_only.csv" else "")
    code, err = _run_folder(images, captions, tmp_path / "out", capsys)
    assert code == 2 and "holds no usable rows" in err and not (tmp_path / "out").exists()


def test_duplicate_column_names_are_refused_naming_them(tmp_path, capsys):
    images, captions = _folder(
        tmp_path, ["file_name,caption,caption", "a.jpg,one caption,another caption"], {"a.jpg": _jpeg()}
    )
    code, err = _run_folder(images, captions, tmp_path / "out", capsys)
    assert code == 2 and "column name(s) 'caption' appear more than once" in err


def test_non_string_captions_are_skipped_and_counted_not_stringified(tmp_path, capsys):
    rows = [
        json.dumps({"file_name": "a.jpg", "caption": {"nested": "dict"}}),
        json.dumps({"file_name": "b.jpg", "caption": 42}),
        json.dumps({"file_name": "c.jpg", "caption": [["inner", "list"]]}),
        json.dumps({"file_name": "d.jpg", "caption": "a real caption"}),
    ]
    files = {f"{c}.jpg": _jpeg() for c in "abcd"}
    images, captions = _folder(tmp_path, rows, files, table="captions.jsonl")
    code, _ = _run_folder(images, captions, tmp_path / "out", capsys)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert code == 0 and report["skipped_by_reason"] == {"not_text_caption": 3}
    assert {s["txt"] for s in read_shards(tmp_path / "out").values()} == {b"a real caption"}


def test_captions_with_nul_or_other_control_characters_are_skipped_and_counted(tmp_path, capsys):
    rows = [
        json.dumps({"file_name": "a.jpg", "caption": "a face\u0000with a NUL"}),
        json.dumps({"file_name": "b.jpg", "caption": "an escape \u001b[31m red"}),
        json.dumps({"file_name": "c.jpg", "caption": "tabs\tand\nnewlines are whitespace"}),
    ]
    images, captions = _folder(tmp_path, rows, {f"{c}.jpg": _jpeg() for c in "abc"}, table="captions.jsonl")
    code, _ = _run_folder(images, captions, tmp_path / "out", capsys)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert code == 0 and report["skipped_by_reason"] == {"control_characters": 2}
    texts = [s["txt"] for s in read_shards(tmp_path / "out").values()]
    assert texts == [b"tabs and newlines are whitespace"]


def test_identical_rows_become_one_sample_and_the_repeat_is_counted(tmp_path, capsys):
    rows = ["file_name,caption", "a.jpg,a smiling face", "a.jpg,a smiling face", "a.jpg,another caption"]
    images, captions = _folder(tmp_path, rows, {"a.jpg": _jpeg()})
    code, _ = _run_folder(images, captions, tmp_path / "out", capsys)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert code == 0 and report["skipped_by_reason"] == {"duplicate_row": 1}
    assert sorted(s["txt"] for s in read_shards(tmp_path / "out").values()) == [
        b"a smiling face",
        b"another caption",
    ]


def test_celeba_image_names_leading_outside_the_root_are_skipped_and_never_read(tmp_path):
    root = tmp_path / "celeba"
    _celeba(root, list(CELEBA_ATTRIBUTES))
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg(colour=(1, 2, 3)))
    (root / "img_align_celeba" / "000003.jpg").symlink_to(secret)  # a symlink out of the root
    text = (root / "list_attr_celeba.txt").read_text().splitlines()
    values = text[2].split(" ", 1)[1]
    names = ["../../secret.jpg", str(secret), "000003.jpg"]
    lines = ["5", text[1], *text[2:], *[f"{name} {values}" for name in names]]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    partition = "".join(f"{name} 0\n" for name in ["000001.jpg", "000002.jpg", *names])
    (root / "list_eval_partition.txt").write_text(partition)
    out = tmp_path / "out"
    assert main(["celeba", str(root), "-o", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["samples"]["written"] == 2 and report["skipped_by_reason"] == {"path_outside_root": 3}
    assert all("secret" not in json.loads(s["json"])["source"] for s in read_shards(out).values())


def test_a_read_only_output_folder_is_named_in_a_clear_message(tmp_path, capsys):
    images, captions = _folder(tmp_path, ["file_name,caption", "a.jpg,a face"], {"a.jpg": _jpeg()})
    out = tmp_path / "readonly"
    out.mkdir()
    immutable = os.geteuid() == 0  # root ignores permission bits; the immutable flag stops root too
    if immutable:
        if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without chattr +i")
    else:
        out.chmod(0o555)
    try:
        code, err = _run_folder(images, captions, out, capsys)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(out)], check=True)
        out.chmod(0o755)
    assert code == 2 and f"cannot write to output folder {str(out)!r}" in err and "Traceback" not in err


def test_a_run_that_writes_no_sample_exits_non_zero(tmp_path, capsys):
    images, captions = _folder(tmp_path, ["file_name,caption", "a.jpg,   ", "b.jpg,"], {"a.jpg": _jpeg()})
    code, err = _run_folder(images, captions, tmp_path / "out", capsys)
    assert code == 1 and "no sample was written (empty_caption 2)" in err
