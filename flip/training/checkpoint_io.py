"""Checkpoint files that are either whole or absent.

Lightning's default save goes through an fsspec transaction whose temporary file lives in the
system temp dir; when that is another filesystem the final move is a copy, and a job killed
mid-copy leaves a truncated `last.ckpt`. Writing beside the target and renaming is atomic on
POSIX, so resume always finds the previous or the new checkpoint, never half of one.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flip.checkpoint import atomic_torch_save, read_checkpoint

__all__ = ["AtomicCheckpointIO", "ModelCheckpoint"]

RESUMABLE = "a checkpoint written by train.py (<run>/checkpoints/last.ckpt, or a DeepSpeed last.ckpt folder)"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes, `weights_only=True` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = True):
        """The caller cannot opt out of `weights_only`; errors name the file (see `read_checkpoint`)."""
        return read_checkpoint(path, RESUMABLE, map_location or (lambda storage, loc: storage))


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ModelCheckpoint, and `last.ckpt` always holds the final weights of a run.

    Lightning writes `last.ckpt` every `every_n_train_steps`, but at the end of training only
    if none was written before: a run of 1,250 steps saving every 200 would end with the
    weights of step 1,200 in `last.ckpt`, and evaluation, `flip.load` and a ZeRO conversion
    would all read those.
    """

    def save_last_now(self, trainer) -> str:
        """`last.ckpt` at the current step, now (a preempted run stops right after); its path."""
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)
