"""AdamW with CLIP's weight-decay split and a linear-warmup cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_MARKERS = (
    "bias",
    "logit_scale",
    "logit_bias",
    "ln",
    "bn",
    "norm",
    "positional_embedding",
    "class_embedding",
)


def decays(name: str, param: nn.Parameter) -> bool:
    """Gains, biases, embeddings of position and the temperature are not weights to shrink."""
    return param.ndim >= 2 and not any(marker in name for marker in NO_DECAY_MARKERS)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in params if decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0},
    ]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base rate, then cosine decay to `min_lr_ratio` of it at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
