"""What `train.py` does with a composed config: build, fit, then evaluate the result.

Kept apart from the Hydra decorator so tests (and other programs) can call it with a config
they composed themselves.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flip.data.datamodule import ShardDataModule
from flip.evaluation.attributes import evaluate_zeroshot_attributes, write_report
from flip.models import FlipModel
from flip.training.checkpoint_io import AtomicCheckpointIO
from flip.training.module import FlipLitModule

log = logging.getLogger(__name__)

REQUIRED_GROUPS = ("model", "loss", "optim", "data", "trainer", "paths")


def validate(cfg: DictConfig) -> None:
    """Fail before any work on what Hydra's own checks cannot see."""
    missing = [group for group in REQUIRED_GROUPS if group not in cfg]
    if missing:
        raise ValueError(
            f"config lacks the groups {missing}; a training config needs {list(REQUIRED_GROUPS)}"
        )
    if cfg.ckpt_path is not None and not os.path.isfile(cfg.ckpt_path):
        raise FileNotFoundError(
            f"ckpt_path={cfg.ckpt_path!r} does not exist; give a .ckpt written by train.py"
        )
    warmup = cfg.optim.warmup_steps
    if warmup < 0 or cfg.optim.lr <= 0:
        raise ValueError(f"optim.lr={cfg.optim.lr} must be > 0 and optim.warmup_steps={warmup} >= 0")


def evaluate_model(
    model: FlipModel,
    eval_cfg: DictConfig,
    datamodule: ShardDataModule,
    output_dir: Path,
    checkpoint: str | None,
) -> dict[str, Any]:
    """Zero-shot attribute evaluation on the configured split; writes metrics.json and report.md."""
    urls = eval_cfg.get("test_shards")
    if urls is None:
        if not hasattr(datamodule, "test_urls"):
            raise ValueError(
                f"eval.test_shards is not set and data={type(datamodule).__name__} has no test split; "
                "set eval.test_shards to labelled shards, or evaluate=false"
            )
        urls = datamodule.test_urls()
    metrics = evaluate_zeroshot_attributes(
        model.eval(),
        list(urls),
        OmegaConf.to_container(eval_cfg, resolve=True),
        benchmark=eval_cfg.benchmark,
        split=eval_cfg.split,
        checkpoint=checkpoint,
        batch_size=eval_cfg.batch_size,
        num_workers=eval_cfg.num_workers,
    )
    write_report(metrics, output_dir)
    return metrics


def _single_console_log() -> None:
    """Lightning adds a console handler of its own; beside Hydra's root handler every line printed twice."""
    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model; returns the last logged metrics and, if run, the evaluation."""
    validate(cfg)
    _single_console_log()
    L.seed_everything(cfg.seed, workers=True)
    module = FlipLitModule(cfg.model, cfg.loss, cfg.optim, micro_batches=cfg.micro_batches)
    datamodule: ShardDataModule = instantiate(cfg.data)
    datamodule.use_model(module.model)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()]
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    results: dict[str, Any] = {"train": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    if cfg.get("evaluate") and trainer.is_global_zero:
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", None) or None
        output_dir = Path(cfg.paths.output_dir) / "eval"
        results["eval"] = evaluate_model(module.model, cfg.eval, datamodule, output_dir, checkpoint)
        log.info("evaluation written to %s", output_dir / "metrics.json")
    return results
