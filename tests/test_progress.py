"""The training progress display counts the whole run in steps, not batches per epoch."""

from __future__ import annotations

import io
from types import SimpleNamespace

import lightning as L
import torch
from rich.text import Text
from torch.utils.data import DataLoader, TensorDataset

from flip.training.progress import RunProgressBar, _SamplesPerSecondColumn, _StepsColumn


class _Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Streamed(torch.utils.data.IterableDataset):
    """A loader without a length, as webdataset's validation stream is: Lightning's total is inf."""

    def __iter__(self):
        yield from (torch.randn(4, 3) for _ in range(2))


def _fit(
    tmp_path, max_steps: int, ckpt_path=None, bar_class: type[RunProgressBar] = RunProgressBar
) -> tuple[RunProgressBar, L.Trainer]:
    bar = bar_class(console_kwargs={"file": io.StringIO(), "force_terminal": True, "width": 200})
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        max_epochs=-1,
        limit_train_batches=3,  # several epochs in one run, as a resampled stream has
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[bar],
        logger=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    data = DataLoader(TensorDataset(torch.randn(12, 3)), batch_size=4)
    trainer.fit(_Linear(), data, DataLoader(_Streamed(), batch_size=None), ckpt_path=ckpt_path)
    bar.refresh(hard=True)  # render every task once more, validation's included
    return bar, trainer


def test_one_task_spans_every_epoch_and_counts_global_steps(tmp_path):
    bar, trainer = _fit(tmp_path, max_steps=7)
    assert trainer.current_epoch >= 2
    training = [t for t in bar.progress.tasks if t.description == RunProgressBar.TRAIN_DESCRIPTION]
    assert len(training) == 1, [t.description for t in bar.progress.tasks]
    (task,) = training
    assert (task.total, task.completed) == (7, 7)
    assert task.fields["samples_per_step"] == 4
    assert not any("Epoch" in t.description for t in bar.progress.tasks)
    assert str(_StepsColumn().render(task)) == "step 7/7"
    validation = [t for t in bar.progress.tasks if t.description != RunProgressBar.TRAIN_DESCRIPTION]
    assert validation and all(str(_StepsColumn().render(t)).endswith("/?") for t in validation)


def test_samples_per_second_is_steps_per_second_times_the_global_batch():
    task = SimpleNamespace(speed=2.5, fields={"samples_per_step": 128})
    rendered = _SamplesPerSecondColumn().render(task)
    assert isinstance(rendered, Text)
    assert str(rendered) == "320 samples/s"


def test_a_resumed_run_starts_at_its_global_step(tmp_path):
    _, first = _fit(tmp_path / "a", max_steps=4)
    checkpoint = tmp_path / "four.ckpt"
    first.save_checkpoint(checkpoint)

    starts: list[float] = []

    class Recording(RunProgressBar):
        def on_train_epoch_start(self, trainer, pl_module):
            super().on_train_epoch_start(trainer, pl_module)
            if not starts:
                starts.append(self.progress.tasks[0].completed)

    bar, _ = _fit(tmp_path / "b", max_steps=7, ckpt_path=checkpoint, bar_class=Recording)
    assert starts == [4]
    (task,) = (t for t in bar.progress.tasks if t.description == RunProgressBar.TRAIN_DESCRIPTION)
    assert (task.total, task.completed) == (7, 7)
