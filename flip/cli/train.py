"""`python train.py` / `flip-train`: Hydra composes conf/train.yaml, flip.training.run trains."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from flip.config import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train(cfg: DictConfig) -> None:
    from flip.training.run import train as run_training

    run_training(cfg)
