"""Commands run as a user types them, in a subprocess, and what those processes need from the machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from .paths import ROOT

# What SLURM and torchrun set for the processes they start: a test of one process clears them.
LAUNCHER_VARIABLES = ("SLURM_", "TORCHELASTIC_", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK",
                      "GROUP_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def flip_root_env(flip_root: Path, threads: int | None = 1) -> dict[str, str]:
    """The environment of a `python train.py` or `eval/*.py` child: its own FLIP_ROOT (data, logs)
    and, by default, one thread, so that processes sharing the machine do not slow each other down."""
    env = {**os.environ, "FLIP_ROOT": str(flip_root)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_train_py(*args: str, flip_root: Path, threads: int | None = None) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess, as a user types it; a failure shows its stderr."""
    env = flip_root_env(flip_root, threads)
    done = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def flip_data_command(*args: str) -> list[str]:
    """`flip-data ARGS` through this interpreter, so the command runs this checkout's code."""
    return [sys.executable, "-m", "flip.cli.data", *args]


def flip_data_env() -> dict[str, str]:
    """The environment of a `flip-data` child: this checkout importable, one thread per process."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
