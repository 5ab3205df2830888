"""A progress display for step-based runs: global step / max steps, samples/s, time left.

Lightning's bar counts batches per epoch ("Epoch 7/-2" when `max_epochs=-1`), but a FLIP run
is sized in optimizer steps over a resampled stream, where an "epoch" is only a checkpointing
unit. This bar keeps one training task for the whole run, advanced to `trainer.global_step`
(so a resumed run starts where it stopped), and estimates the time left from the recent step
rate. Validation keeps Lightning's own bar beside it.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from rich.progress import ProgressColumn, Task, TextColumn
from rich.text import Text


class _StepsColumn(ProgressColumn):
    """`step N/M` for the run's task; Lightning's validation tasks count batches."""

    def render(self, task: Task) -> Text:
        known = task.total is not None and math.isfinite(task.total)  # streamed loaders have no length
        total = f"{int(task.total):,}" if known else "?"
        unit = "step " if "samples_per_step" in task.fields else ""
        return Text(f"{unit}{int(task.completed):,}/{total}", style="progress.download")


class _SamplesPerSecondColumn(ProgressColumn):
    """Samples/s over Rich's recent window (steps/s times the global batch); steps/s without one."""

    def render(self, task: Task) -> Text:
        samples_per_step = task.fields.get("samples_per_step")
        if task.speed is None:
            return Text("-- samples/s" if samples_per_step else "", style="progress.data.speed")
        if not samples_per_step:
            return Text(f"{task.speed:.2f} it/s", style="progress.data.speed")
        return Text(f"{task.speed * samples_per_step:,.0f} samples/s", style="progress.data.speed")


class _ElapsedRemainingColumn(ProgressColumn):
    max_refresh = 0.5

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        remaining = task.time_remaining
        shown = ["-:--:--" if s is None else str(timedelta(seconds=int(s))) for s in (elapsed, remaining)]
        return Text(f"{shown[0]} elapsed, {shown[1]} left", style="progress.remaining")


class RunProgressBar(RichProgressBar):
    """Rich progress over the whole run rather than per epoch (see the module docstring)."""

    TRAIN_DESCRIPTION = "Training"

    def total_run_steps(self, trainer: L.Trainer) -> int | None:
        """Optimizer steps the run will take, or None when neither max_steps nor max_epochs bound it."""
        total = trainer.estimated_stepping_batches
        return None if total == float("inf") else int(total)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:
            self.train_progress_bar_id = self.progress.add_task(
                self.TRAIN_DESCRIPTION,
                total=self.total_run_steps(trainer),
                completed=trainer.global_step,
                samples_per_step=None,
            )
        self.refresh()

    def _initialize_train_progress_bar_id(self) -> None:
        # Lightning calls this when a batch ends before any epoch started a task (mid-epoch resume)
        self.on_train_epoch_start(self.trainer, self.trainer.lightning_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        if self.progress is not None:
            self.progress.update(
                self.train_progress_bar_id,
                completed=trainer.global_step,
                samples_per_step=_batch_size(batch) * trainer.world_size,
            )
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def configure_columns(self, trainer: L.Trainer) -> list:
        columns = super().configure_columns(trainer)
        # description and bar as Lightning draws them, then the run's own counters
        return [
            TextColumn("[progress.description]{task.description}"),
            columns[1],
            _StepsColumn(),
            _ElapsedRemainingColumn(),
            _SamplesPerSecondColumn(),
        ]


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (images), whatever the batch's container."""
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return len(first)
