"""`python finetune.py` / `flip-finetune`: Hydra composes conf/finetune.yaml, then
flip.training.finetune.run fine-tunes."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from flip.config import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="finetune")
def finetune(cfg: DictConfig) -> None:
    from flip.training.finetune.run import finetune as run_finetune

    run_finetune(cfg)
