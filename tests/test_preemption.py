"""Preemption with real signals on real `python train.py` processes: SIGTERM and Slurm's requeue
signal stop every rank at one step with a resumable checkpoint and a non-zero exit; the resumed
run equals an uninterrupted one; loader workers never save or requeue; every rank has its own
random stream from the same initial weights, and restores its own on resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from flip.training.resume import resolve_ckpt_path, resume_candidates

from .helpers import ROOT, SHARDS_BASE, csv_losses, flip_root_env, write_caption_shards

EXIT_SIGTERM, EXIT_SIGUSR1 = 128 + signal.SIGTERM, 128 + signal.SIGUSR1


class ReportSteps(L.Callback):
    """Writes each rank's pid, step, weights digest and RNG digest to `<folder>/rank<R>.json` after
    every step, and slows steps down so a test can signal a run in the middle of it."""

    def __init__(self, folder: str, seconds: float = 0.3) -> None:
        self.folder, self.seconds = Path(folder), seconds

    def _write(self, trainer, pl_module, **extra) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{trainer.global_rank}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        report = {**old, "pid": os.getpid(), "step": trainer.global_step, **extra}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        tmp.replace(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            weights = b"".join(p.detach().cpu().numpy().tobytes() for p in pl_module.model.parameters())
            rng = torch.get_rng_state().numpy().tobytes()
            self._write(
                trainer, pl_module,
                weights=hashlib.sha256(weights).hexdigest(), rng=hashlib.sha256(rng).hexdigest(),
            )  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._write(trainer, pl_module)
        time.sleep(self.seconds)


def _overrides(tmp_path: Path, shards: Path, *extra: str, workers: int = 0, report: bool = True) -> list[str]:
    callback = (
        f"+callbacks.report={{_target_: tests.test_preemption.ReportSteps, folder: '{tmp_path / 'ranks'}'}}"
    )
    return [
        *SHARDS_BASE, f"data.train_shards={shards}", "data.batch_size=8", f"data.num_workers={workers}",
        "data.shuffle_buffer=16", "data.samples_per_epoch=100000", "trainer.val_check_interval=null",
        "callbacks.model_checkpoint.every_n_train_steps=1000", "optim.warmup_steps=2",
        "+model.arch.vision_cfg.patch_dropout=0.25", f"hydra.run.dir={tmp_path / 'run'}",
        *([callback] if report else []), *extra,
    ]  # fmt: skip


def _start(tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**flip_root_env(tmp_path), **(env or {})}
    log = open(tmp_path / "train.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def _wait_for(proc: subprocess.Popen, tmp_path: Path, condition, timeout: float = 240) -> dict[int, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reports = {}
        for path in (tmp_path / "ranks").glob("rank*.json"):
            reports[int(path.stem[4:])] = json.loads(path.read_text())
        if condition(reports):
            return reports
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out; log:\n{(tmp_path / 'train.log').read_text()[-3000:]}")


def _finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # a rank left waiting for the others: the failure this guards against
        proc.kill()
        proc.wait()
        log = (tmp_path / "train.log").read_text()[-3000:]
        raise AssertionError(f"the run did not stop; log:\n{log}") from None


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True)["global_step"]


@pytest.fixture
def shards(tmp_path) -> Path:
    return Path(write_caption_shards(tmp_path / "shards", count=120, per_shard=20)[0]).parent


@pytest.mark.slow
def test_sigterm_saves_where_it_stopped_exits_non_zero_and_resumes_exactly(tmp_path, shards):
    whole = tmp_path / "whole"
    done = subprocess.run(
        [sys.executable, "train.py", *_overrides(whole, shards, "trainer.max_steps=7", report=False)],
        cwd=ROOT, env=flip_root_env(whole),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    split = tmp_path / "split"
    split.mkdir()
    proc = _start(split, _overrides(split, shards, "trainer.max_steps=7"))
    _wait_for(proc, split, lambda r: r.get(0, {}).get("step", 0) >= 3)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc, split) == EXIT_SIGTERM  # not 0: a scheduler must not see success
    stopped = json.loads((split / "ranks" / "rank0.json").read_text())["step"]
    last = split / "run" / "checkpoints" / "last.ckpt"
    assert 3 <= stopped < 7 and _step_of(last) == stopped  # saved at the step it stopped at
    saved = torch.load(last, weights_only=True)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": stopped}]
    assert "optimizer_states" in saved and saved["flip_rng_state"]
    assert "stopped at step" in (split / "train.log").read_text()

    resumed = subprocess.run(
        [sys.executable, "train.py", *_overrides(split, shards, "trainer.max_steps=7", "ckpt_path=auto",
                                                 report=False)],
        cwd=ROOT, env=flip_root_env(split),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _step_of(last) == 7
    expected, after = csv_losses(whole / "run"), csv_losses(split / "run", 1)
    assert sorted(after) == list(range(stopped, 7))  # continued, not restarted
    for step in after:
        assert after[step] == pytest.approx(expected[step], rel=0, abs=1e-6), (step, after, expected)


@pytest.mark.slow
def test_slurm_requeue_signal_requeues_once_saves_once_and_workers_never_act(tmp_path, shards):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$PPID $*" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "flip", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
        "SLURM_NODELIST": "node1", "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }  # fmt: skip
    proc = _start(tmp_path, _overrides(tmp_path, shards, "trainer.max_steps=100000", workers=2), env=slurm)
    _wait_for(proc, tmp_path, lambda r: r.get(0, {}).get("step", 0) >= 2)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:  # Slurm signals every process of the step, loader workers included
        os.kill(pid, signal.SIGUSR1)
    time.sleep(1.5)
    assert proc.poll() is None and not calls.exists()  # a worker neither saves, nor requeues, nor dies
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    proc.send_signal(signal.SIGUSR1)
    assert _finish(proc, tmp_path) == EXIT_SIGUSR1
    assert calls.read_text().splitlines() == [f"{proc.pid} requeue 4242"]  # once, from the main process
    stopped = json.loads((tmp_path / "ranks" / "rank0.json").read_text())["step"]
    saved = sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*.ckpt"))
    assert saved == [Path("checkpoints/last.ckpt")]  # one checkpoint, no hpc_ckpt_N piling up
    assert _step_of(tmp_path / "run" / "checkpoints" / "last.ckpt") == stopped
    assert resolve_ckpt_path("auto", tmp_path / "run") == str(tmp_path / "run" / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_a_signal_to_one_ddp_rank_stops_both_at_the_same_step_and_resume_is_exact(tmp_path, shards):
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    whole = tmp_path / "whole"
    whole.mkdir()
    done = subprocess.run(
        [sys.executable, "train.py", *_overrides(whole, shards, *ddp, "trainer.max_steps=6")],
        cwd=ROOT, env=flip_root_env(whole),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {r: json.loads((whole / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert ranks[0]["weights"] == ranks[1]["weights"]  # one initial model on every rank
    assert ranks[0]["rng"] != ranks[1]["rng"]  # but each rank its own dropout draws

    split = tmp_path / "split"
    split.mkdir()
    proc = _start(split, _overrides(split, shards, *ddp, "trainer.max_steps=6"))
    reports = _wait_for(proc, split, lambda r: len(r) == 2 and min(x["step"] for x in r.values()) >= 2)
    os.kill(reports[1]["pid"], signal.SIGTERM)  # rank 1 only, not the launching rank 0
    assert _finish(proc, split) == EXIT_SIGTERM
    log = (split / "train.log").read_text()
    stops = {int(line.split("rank ")[1].split(":")[0]): int(line.rsplit("step ", 1)[1].split(",")[0])
             for line in log.splitlines() if "stopped at step" in line}  # fmt: skip
    assert set(stops) == {0, 1} and stops[0] == stops[1], log[-3000:]  # both ranks, one step
    last = split / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == stops[0] and len(saved["flip_rng_state"]) == 2  # every rank's RNG

    resumed = subprocess.run(
        [sys.executable, "train.py", *_overrides(split, shards, *ddp, "trainer.max_steps=6", "ckpt_path=auto",
                                                 report=False)],
        cwd=ROOT, env=flip_root_env(split),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, after = csv_losses(whole / "run"), csv_losses(split / "run", 1)
    assert sorted(after) == list(range(stops[0], 6))
    for step in after:  # rank 1's restored generator feeds the global batch of rank 0's logged loss
        assert after[step] == pytest.approx(expected[step], rel=0, abs=1e-6), (step, after, expected)


def test_auto_resume_takes_the_newest_whole_checkpoint_of_either_kind(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert resolve_ckpt_path("auto", run) is None  # first start of a job: from scratch
    last, hpc = run / "checkpoints" / "last.ckpt", run / "hpc_ckpt_2.ckpt"
    last.write_bytes(b"x")
    hpc.write_bytes(b"x")
    (run / ".hpc_ckpt_3.ckpt.k2j9x1.tmp").write_bytes(b"half")  # a SIGKILL mid-save left this
    (run / "hpc_ckpt_4.ckpt.part").write_bytes(b"half")
    os.utime(last, (time.time() - 60, time.time() - 60))
    assert sorted(resume_candidates(run)) == sorted([last, hpc])
    assert resolve_ckpt_path("auto", run) == str(hpc)
    os.utime(last, None)
    assert resolve_ckpt_path("auto", run) == str(last)
    assert resolve_ckpt_path(str(hpc), run) == str(hpc)  # an explicit path is taken as given
