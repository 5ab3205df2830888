"""AdamW with CLIP's weight-decay split, per-tower learning rates and a warmup-cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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
TOWER_OF_PREFIX = (("clip.visual.", "image"), ("clip.logit_", "temperature"))


def decays(name: str, param: nn.Parameter) -> bool:
    """Gains, biases, embeddings of position and the temperature are not weights to shrink."""
    return param.ndim >= 2 and not any(marker in name for marker in NO_DECAY_MARKERS)


def tower_of(name: str) -> str:
    """`image`, `text` or `temperature` for a parameter name of a FlipModel (open_clip layout)."""
    return next((tower for prefix, tower in TOWER_OF_PREFIX if name.startswith(prefix)), "text")


def parameter_groups(
    model: nn.Module, weight_decay: float, tower_lrs: Mapping[str, float | None] | None = None
) -> list[dict]:
    """Trainable parameters in (decay, no decay) groups, split by tower when towers get their own rate.

    `tower_lrs` maps `image` / `text` to a learning rate (None: the optimizer's base rate). A
    frozen tower (LiT) has no trainable parameters and so no group.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rates = {tower: lr for tower, lr in (tower_lrs or {}).items() if lr is not None}
    groups = []
    for tower in sorted({tower_of(n) for n, _ in params} if rates else {None}, key=str):
        members = [(n, p) for n, p in params if tower is None or tower_of(n) == tower]
        for decayed in (True, False):
            group = {
                "params": [p for n, p in members if decays(n, p) == decayed],
                "weight_decay": weight_decay if decayed else 0.0,
            }
            if tower is not None:
                group["name"] = f"{tower}{'' if decayed else '_no_decay'}"
                if tower in rates:
                    group["lr"] = float(rates[tower])
            if group["params"] or tower is None:
                groups.append(group)
    return groups


def optimizer_class(strategy: Any) -> type[torch.optim.Optimizer]:
    """torch's AdamW, except under ZeRO-Offload, where DeepSpeed wants its CPU Adam (AdamW mode).

    DeepSpeed refuses a torch optimizer whose states it offloads to the CPU unless told not
    to; its own CPU Adam is also several times faster there.
    """
    config = getattr(strategy, "config", None) or {}
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if offload.get("device") in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam
    return torch.optim.AdamW


def build_optimizer(
    model: nn.Module, optim: Mapping[str, Any], strategy: Any = None
) -> torch.optim.Optimizer:
    groups = parameter_groups(
        model, optim["weight_decay"], {"image": optim.get("lr_image"), "text": optim.get("lr_text")}
    )
    if not any(group["params"] for group in groups):
        raise ValueError("nothing to train: every parameter is frozen (optim.lock_image and optim.lock_text)")
    cls = optimizer_class(strategy)
    kwargs = {"lr": optim["lr"], "betas": tuple(optim["betas"]), "eps": optim["eps"]}
    if cls is not torch.optim.AdamW:
        kwargs["adamw_mode"] = True
    elif optim.get("fused"):
        kwargs["fused"] = True
    return cls(groups, **kwargs)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base rate, then cosine decay to `min_lr_ratio` of it at `total_steps`.

    The factor multiplies each parameter group's own rate, so per-tower rates keep their ratio.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_schedule(
    optimizer: torch.optim.Optimizer, optim: Mapping[str, Any], total_steps: int
) -> dict[str, Any]:
    """`configure_optimizers`' answer for an `optim` config: `warmup_steps` as steps, or below 1 as a
    fraction of `total_steps`, then `warmup_cosine`, stepped every optimizer step."""
    warmup = optim["warmup_steps"]
    if isinstance(warmup, float) and warmup < 1:
        warmup = int(warmup * total_steps)
    scheduler = warmup_cosine(optimizer, int(warmup), total_steps, optim.get("min_lr_ratio", 0.0))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
