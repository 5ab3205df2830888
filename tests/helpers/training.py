"""Short Lightning fits of a FlipLitModule on random batches, losses that turn NaN on cue, and the
training losses a run logged."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch


class Poisoned(torch.nn.Module):
    """A loss whose every term turns NaN while `now()` is true: the non-finite guard's input."""

    def __init__(self, criterion, now) -> None:
        super().__init__()
        self.criterion, self.now, self.requires_tokens = criterion, now, criterion.requires_tokens

    def forward(self, features):
        losses = self.criterion(features)
        return {k: v * float("nan") for k, v in losses.items()} if self.now() else losses


class NaNLoss(L.Callback):
    """Makes the loss NaN at the given steps (all steps when None), and records the weights."""

    def __init__(self, steps=None) -> None:
        self.steps, self.weights, self.rates = steps, {}, {}

    def on_train_start(self, trainer, module) -> None:
        module.criterion = Poisoned(
            module.criterion, lambda: self.steps is None or trainer.global_step in self.steps
        )

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.weights[trainer.global_step] = {
            k: v.detach().clone() for k, v in module.model.state_dict().items()
        }
        self.rates[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def random_batch(model, n: int = 6):
    """`n` random 32x32 images and face captions tokenized for `model`."""
    words = ["red hat", "glasses", "a beard", "smiling", "bald", "long hair"]
    return torch.randn(n, 3, 32, 32), model.tokenize([f"a face with {words[i % 6]}" for i in range(n)])


def fit_briefly(module, callbacks=(), steps: int = 3, **trainer_kwargs) -> L.Trainer:
    """`steps` steps of `module` on four batches of six random samples, on the CPU, nothing saved."""
    images, text = random_batch(module.model, 24)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, text), batch_size=6)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module, loader)
    return trainer


def csv_losses(run: Path, version: int | None = None) -> dict[int, float]:
    """Logged training loss by step, of one CSV version (a resumed run writes the next) or all."""
    losses = {}
    pattern = "version_*" if version is None else f"version_{version}"
    for path in sorted((run / "csv").glob(f"{pattern}/metrics.csv")):
        with open(path) as f:
            losses |= {
                int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")
            }
    return losses


def count_filip_blocks(monkeypatch) -> list[int]:
    """A list that grows by one per similarity block FILIP computes (forward and backward alike)."""
    import flip.losses.filip as filip

    calls, block = [], filip._block
    monkeypatch.setattr(filip, "_block", lambda *a: calls.append(1) or block(*a))
    return calls
