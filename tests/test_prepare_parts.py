"""`flip-data ... --num-parts N --part K` and `flip-data merge-report`: a job split over machines.

The parts of a job, run in any order, write every sample of a one-machine run exactly once,
byte for byte, and their merged report counts what the one-machine report counts; a merge
refuses while any part is missing, running or unfinished, naming it; bad flags are refused
naming the value and what is accepted.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from flip.cli.data import main
from flip.data.datamodule import check_finished_output
from flip.locking import hold_lock
from flip.prepare.parts import Part, part_of

from .helpers import read_shards, write_img2dataset
from .test_prepare_celeba import write_celeba

PARTS = 3


def _folder(root: Path, shuffled: bool) -> list[str]:
    """Images + a captions table with bad rows of every kind met while reading and while writing;
    `shuffled` lists the same images in another order (each image's captions stay in order)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    groups = []
    for i in range(14):
        Image.new("RGB", (10, 8), (15 * i, 90, 200 - 12 * i)).save(images / f"face{i}.png")
        groups.append([f"face{i}.png,face number {i}"])
    groups[3].append("face3.png,a second caption of face three")
    groups.append(["face5.png,face number 5"])  # a duplicate row
    (images / "sub").mkdir(exist_ok=True)
    Image.new("RGB", (9, 9), (1, 2, 3)).save(images / "sub" / "a b.jpg")
    groups.append(["sub/a b.jpg,a key the path cannot spell"])
    (images / "broken.jpg").write_bytes(b"<html>not an image</html>")
    groups.append(["broken.jpg,an image that cannot be decoded"])
    groups.append(["missing.jpg,an image that is not there"])
    groups.append(["face7.png,   "])  # an empty caption
    (images / "unlisted.png").write_bytes((images / "face0.png").read_bytes())
    if shuffled:
        random.Random(1).shuffle(groups)
    table = root / "captions.csv"
    table.write_text("\n".join(["file_name,caption", *[row for g in groups for row in g]]) + "\n")
    return ["folder", str(images), "--captions", str(table)]


def _facecaption(root: Path, shuffled: bool) -> list[str]:
    images = root / "laion-face"
    if not images.exists():
        downloads = [
            [
                {
                    "url": f"http://x/{s}/{i}.jpg",
                    "caption": "",
                    "image": Image.new("RGB", (40, 30), (20 * i, 9, 9)),
                }
                for i in range(5)
            ]
            for s in range(2)
        ]
        write_img2dataset(images, downloads)
    rows = [(f"http://x/{s}/{i}.jpg", [4, 3, 30, 27], f"face {s}/{i}") for s in range(2) for i in range(5)]
    rows += [
        ("http://x/0/1.jpg", [10, 10, 38, 28], "a second face in one image"),
        ("http://x/0/2.jpg", [4, 3, 30, 27], "the same face again"),  # duplicate_key
        ("http://nowhere/1.jpg", [1, 1, 20, 20], "never downloaded"),
        ("http://x/1/1.jpg", "[1, 2, 3]", "a box of three numbers"),
        ("http://x/1/2.jpg", [5, 5, 25, 25], None),
    ]
    if shuffled:
        random.Random(2).shuffle(rows)
    parquet = root / f"FaceCaption{'-shuffled' if shuffled else ''}.parquet"
    frame = pd.DataFrame(rows, columns=["url", "face_bbox", "face_caption"])
    frame["face_bbox"] = frame["face_bbox"].map(str)
    frame.to_parquet(parquet)
    return ["facecaption15m", "--parquet", str(parquet), "--images", str(images)]


def _celeba(root: Path, shuffled: bool) -> list[str]:
    celeba = root / "celeba"
    if not celeba.exists():
        write_celeba(celeba, count=14)
        (celeba / "Img" / "img_align_celeba" / "000004.jpg").unlink()
        (celeba / "Img" / "img_align_celeba" / "000009.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    if shuffled:  # the attribute file's rows in another order
        attributes = celeba / "Anno" / "list_attr_celeba.txt"
        lines = attributes.read_text().splitlines(keepends=True)
        rows = lines[2:]
        random.Random(3).shuffle(rows)
        attributes.write_text("".join(lines[:2] + rows))
    return ["celeba", str(celeba), "--split", "all"]


SOURCES = {"folder": _folder, "facecaption15m": _facecaption, "celeba": _celeba}
FLAGS = ["--samples-per-shard", "2", "--workers", "1", "--no-progress"]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _part_samples(out: Path, report: dict) -> dict[str, dict[str, bytes]]:
    samples = {}
    for name in report["shards"]:
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_a_key_belongs_to_the_part_its_sha256_names_and_to_no_other():
    keys = [f"key{i}_{random.Random(i).random()}" for i in range(3000)]
    for count in (1, 2, 5):
        owners = [[k for k in range(count) if Part(k, count).owns(key)] for key in keys]
        reference = [int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) % count for key in keys]
        assert owners == [[r] for r in reference]
        assert [part_of(key, count) for key in keys] == reference
        sizes = [reference.count(k) for k in range(count)]
        assert min(sizes) > 0.9 * len(keys) / count, sizes  # balanced within 10%


@pytest.mark.parametrize("command", list(SOURCES))
def test_parts_write_every_sample_once_and_add_up_to_one_machine(command, tmp_path, capsys):
    make = SOURCES[command]
    one, many = tmp_path / "one", tmp_path / "many"
    assert _run([*make(tmp_path, shuffled=False), "-o", str(one), *FLAGS], capsys)[0] == 0
    single = json.loads((one / "report.json").read_text())
    reports = []
    for k in (2, 0, 1):  # any order, from the inputs listed in another order
        argv = [*make(tmp_path, shuffled=True), "-o", str(many), *FLAGS, "--num-parts", str(PARTS)]
        assert _run([*argv, "--part", str(k)], capsys)[0] == 0
        reports.append(json.loads((many / Part(k, PARTS).report_name).read_text()))
    with pytest.raises(RuntimeError, match=r"merge-report"):  # training waits for the merge
        check_finished_output(str(many), "data.train_shards")

    assert _run(["merge-report", str(many)], capsys)[0] == 0
    merged = json.loads((many / "report.json").read_text())
    check_finished_output(str(many), "data.train_shards")

    expected = read_shards(one)
    by_part = [_part_samples(many, r) for r in reports]
    keys = [set(s) for s in by_part]
    assert sum(len(k) for k in keys) == len(set().union(*keys)) == len(expected) > 8  # disjoint, all
    for k, samples in zip((2, 0, 1), by_part, strict=True):
        assert all(part_of(key, PARTS) == k for key in samples)
        assert {key: expected[key] for key in samples} == samples  # the same bytes per key
    assert read_shards(many) == expected  # a key in two parts' shards would fail here
    assert merged["samples"] == single["samples"]
    assert (
        merged["skipped_by_reason"] == single["skipped_by_reason"] and len(single["skipped_by_reason"]) >= 2
    )
    assert sorted(merged["shards"]) == sorted(p.name for p in many.glob("*.tar"))
    assert merged["parts"]["count"] == PARTS and merged["settings"] == {
        k: v for k, v in single["settings"].items() if k != "workers"
    }


def test_merge_report_refuses_until_every_part_has_finished_naming_each(tmp_path, capsys):
    argv = [*_folder(tmp_path, shuffled=False), "-o", str(tmp_path / "out"), *FLAGS]
    out = tmp_path / "out"

    def part(k: int, *extra: str) -> int:
        return _run([*argv, "--num-parts", "3", "--part", str(k), *extra], capsys)[0]

    def refused(*names: str) -> str:
        code, err = _run(["merge-report", str(out)], capsys)
        assert code == 1 and not (out / "report.json").exists(), err
        for name in names:
            assert name in err, err
        return err

    out.mkdir()  # part 2 started a moment earlier: a shard of it, no .flip-data marker yet
    (out / "part-00002-of-00003-00000.tar").write_bytes(b"")
    assert part(0) == part(2) == 0
    refused("1 of 3 parts", "part 1 (never ran")
    assert part(1) == 0
    (out / Part(1, 3).report_name).unlink()  # as if killed before its end
    finished = len(list(out.glob("part-00001-of-00003-*_stats.json")))
    refused(
        f"part 1 (no part-00001-of-00003-report.json: it stopped before the end, {finished} shard(s) finished"
    )
    with hold_lock(out / Part(1, 3).lock_name, "part 1"):
        refused("part 1 (still running: pid")
        assert "in use by" in _run([*argv, "--num-parts", "3", "--part", "1"], capsys)[1]
    assert part(1) == 0  # resumes: every shard of it was finished
    assert json.loads((out / Part(1, 3).report_name).read_text())["shards_resumed"] == finished > 1
    assert _run(["merge-report", str(out)], capsys)[0] == 0 and (out / "report.json").is_file()

    assert part(2, "--jpeg-quality", "80") == 0  # a part run again removes the merged report
    assert not (out / "report.json").exists()
    code, err = _run(["merge-report", str(out)], capsys)
    assert code == 2 and "part 2 was run with other settings than part 0" in err, err

    code, err = _run([*argv[:4], "-o", str(out), *FLAGS, "--num-parts", "2", "--part", "0"], capsys)
    assert code == 2 and "part-00000-of-00003-00000.tar" in err and "--num-parts 3" in err, err
    code, err = _run([*argv[:4], "-o", str(out), *FLAGS], capsys)  # one machine into a parts folder
    assert code == 2 and "--num-parts 3" in err and "one machine" in err, err
    code, err = _run(["merge-report", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--num-parts", "0", "--part", "0"],
            "--num-parts: '0' is not accepted: give the number of parts, an integer >= 1",
        ),
        (["--num-parts", "two", "--part", "0"], "--num-parts: 'two' is not accepted"),
        (["--num-parts", "4", "--part", "4"], "--part 4 with --num-parts 4: accepted: 0 to 3"),
        (
            ["--num-parts", "4", "--part", "-1"],
            "--part: '-1' is not accepted: give the part number, an integer from 0",
        ),
        (["--num-parts", "4"], "--num-parts 4 needs --part K, K from 0 to 3"),
        (["--part", "2"], "--part 2 needs --num-parts N"),
    ],
)
def test_bad_part_flags_are_refused_naming_the_value_and_what_is_accepted(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run([*_folder(tmp_path, shuffled=False), "-o", str(out), *FLAGS, *flags], capsys)
    assert code == 2 and message in err, err
    assert not out.exists()  # refused before anything was written


def test_parts_built_in_python_are_checked_too():
    assert (
        Part() == Part(0, 1) and Part().whole and Part(2, 3).shard_name(7) == "part-00002-of-00003-00007.tar"
    )
    for index, count, message in [
        (0, 0, "--num-parts 0: accepted: an integer >= 1"),
        (3, 3, "accepted: 0 to 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            Part(index, count)
    with pytest.raises(ValueError, match="--part True is not an integer"):
        Part(True, 2)
