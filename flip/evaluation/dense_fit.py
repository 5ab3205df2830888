"""Training a dense head on cached token maps: AdamW, a cosine schedule to 0, the best epoch kept.

The token maps of a split are one float16 tensor [N, blocks, width, h, w] (on the CPU, where
they were cached); batches are seeded index slices of it, moved to the model's device as
float32. After every epoch the head is scored by the caller (on the validation split or the
held-out part of train) and its parameters at the best score are what is returned, as the
token probe selects its epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from flip.evaluation.token_head import flushing_denormals


@dataclass(frozen=True)
class DenseSettings:
    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 32
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(
                f"epochs={self.epochs}, batch_size={self.batch_size} and lr={self.lr}: "
                "epochs and batch_size at least 1, lr positive"
            )


@dataclass
class Fitted:
    """The head at its best epoch, that epoch (1-based) and the score after every epoch."""

    head: nn.Module
    epoch: int
    scores: list[float] = field(default_factory=list)


def predict(head: nn.Module, maps: torch.Tensor, rows: torch.Tensor | None = None, batch_size: int = 64):
    """The head's outputs (float32, CPU) on `maps[rows]` (all rows when None), batch by batch."""
    device = next(head.parameters()).device
    rows = torch.arange(len(maps)) if rows is None else rows.cpu()
    was_training = head.training
    head.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = maps[rows[start : start + batch_size]].to(device, torch.float32)
            out.append(head(batch).float().cpu())
    head.train(was_training)
    return torch.cat(out)


def fit_dense_head(
    head: nn.Module,
    maps: torch.Tensor,
    rows: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    score: Callable[[nn.Module], float],
    settings: DenseSettings,
) -> Fitted:
    """Trains `head` on `maps[rows]`: `loss(outputs, rows of the batch)` is minimised, `score(head)`
    (higher is better; NaN counts as worst) picks the epoch. Seeded: the same call gives the same head."""
    device = next(head.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * math.ceil(len(rows) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
    )
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    scores: list[float] = []
    with flushing_denormals():
        for epoch in range(1, settings.epochs + 1):
            head.train()
            order = rows[torch.randperm(len(rows), generator=generator)]
            for start in range(0, len(order), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                value = loss(head(maps[batch].to(device, torch.float32)), batch)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                schedule.step()
            head.eval()
            result = float(score(head))
            scores.append(result)
            ranked = -math.inf if math.isnan(result) else result
            if best is None or ranked > best[0]:
                best = (ranked, epoch, {k: v.detach().clone() for k, v in head.state_dict().items()})
    head.load_state_dict(best[2])
    return Fitted(head, best[1], scores)
