"""Checkpoints in the form train.py writes, made from a model in memory without training it."""

from __future__ import annotations

from pathlib import Path

import torch

from .configs import TINY_ARCH


def save_checkpoint(model, path: Path) -> Path:
    """A checkpoint in the form train.py writes (hyperparameters + `model.`-prefixed weights)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    hparams = {"model": {"name": "flip-test-tiny", "arch": TINY_ARCH, "pretrained": None}, "loss": {}}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    return path
