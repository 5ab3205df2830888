"""`python train.py` / `flip-train`: Hydra composes conf/train.yaml, flip.training.run trains."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from flip.config import CONFIG_PATH, check_moved_keys, override_key


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _compose_and_train(cfg: DictConfig) -> None:
    from flip.training.run import train as run_training

    run_training(cfg)


def train() -> None:
    """The entry point: an old config key on the command line fails with the new key's name."""
    try:
        check_moved_keys(override_key(arg) for arg in sys.argv[1:])
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    _compose_and_train()
