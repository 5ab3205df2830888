"""Checkpoint files that are either whole or absent.

Lightning's default save goes through an fsspec transaction whose temporary file lives in the
system temp dir; when that is another filesystem the final move is a copy, and a job killed
mid-copy leaves a truncated `last.ckpt`. Writing beside the target and renaming is atomic on
POSIX, so resume always finds the previous or the new checkpoint, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator[IO]:
    """An open temp file beside `path`, flushed to disk and renamed onto it on success."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    started = time.time()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(path, "wb") as f:
        torch.save(obj, f)
    _remove_stale_temporaries(path, started)


def _remove_stale_temporaries(path: Path, before: float) -> None:
    """A process killed mid-write (SIGKILL runs no cleanup) leaves its temp file behind; the
    next successful save of the same target removes those last written before it started."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < before:
                stale.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """A small text file (DeepSpeed's `latest` tag) that is either the old or the new one."""
    with _atomic_file(Path(path), "w") as f:
        f.write(text)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes, `weights_only=True` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = True):
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ModelCheckpoint, and `last.ckpt` always holds the final weights of a run.

    Lightning writes `last.ckpt` every `every_n_train_steps`, but at the end of training only
    if none was written before: a run of 1,250 steps saving every 200 would end with the
    weights of step 1,200 in `last.ckpt`, and evaluation, `flip.load` and a ZeRO conversion
    would all read those.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)
