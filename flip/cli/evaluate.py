"""Hydra entry points of eval/zeroshot.py, eval/linear_probe.py and eval/retrieval.py.

Each composes conf/eval_<protocol>.yaml (the model, `benchmark=<name>`, output_dir, ...) and
runs the protocol of flip.evaluation.runner.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from flip.config import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval_zeroshot")
def zeroshot(cfg: DictConfig) -> None:
    from flip.evaluation.runner import run_zeroshot

    run_zeroshot(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval_linear_probe")
def linear_probe(cfg: DictConfig) -> None:
    from flip.evaluation.runner import run_linear_probe

    run_linear_probe(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval_retrieval")
def retrieval(cfg: DictConfig) -> None:
    from flip.evaluation.runner import run_retrieval

    run_retrieval(cfg)
