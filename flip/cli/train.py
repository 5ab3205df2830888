"""`python train.py` / `flip-train`: Hydra composes conf/train.yaml, flip.training.run trains."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from flip.cli import refuse_moved_overrides
from flip.config import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _compose_and_train(cfg: DictConfig) -> None:
    from flip.training.run import train as run_training

    run_training(cfg)


def train() -> None:
    """The entry point: an old config key on the command line fails with the new key's name."""
    refuse_moved_overrides()
    _compose_and_train()
