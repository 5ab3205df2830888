"""The config an entry point (train.py, finetune.py, eval/*.py) would compose, for a bench that
calls its function in-process, one run folder per run.

The benches run many trainings and evaluations in one process, each writing into its own folder
and reading generated data from another; outside a Hydra app, that is composing the entry
point's config, pointing its paths at those folders, and registering it as the running Hydra
config (the run code reads its output folder from there).
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from flip.config import CONFIG_PATH


def run_config(config: str, overrides: list[str], run: Path, data: Path) -> DictConfig:
    """conf/<config>.yaml with `overrides`, writing into `run` and reading data from `data`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(CONFIG_PATH).resolve()), version_base="1.3"):
        cfg = compose(config_name=config, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir, cfg.paths.data_dir, cfg.paths.log_dir = (
            str(run.parent),
            str(data),
            str(run / "logs"),
        )
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(run)
    HydraConfig().set_config(cfg)
    return cfg
