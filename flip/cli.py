"""Console entry points. Configuration is Hydra's: see conf/ and `--help`."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

# conf/ lives beside the package in a checkout (editable install); an absolute path lets Hydra
# find it whether this module runs as train.py's import or as the flip-train console script.
CONFIG_PATH = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train(cfg: DictConfig) -> None:
    from flip.training.run import train as run_training

    run_training(cfg)
