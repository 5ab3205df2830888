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
from omegaconf import DictConfig

from flip.data.datamodule import FaceShapesDataModule, ShardDataModule, resolve_shards
from flip.datasets.shards import read_labelled_shards
from flip.evaluation.features import split_features
from flip.evaluation.report import write_report
from flip.evaluation.runner import benchmark_prompts, load_split, probe_metrics
from flip.evaluation.zeroshot import evaluate_zeroshot
from flip.models import FlipModel
from flip.training.callbacks import ZeroShotBenchmark
from flip.training.checkpoint_io import AtomicCheckpointIO
from flip.training.deepspeed import model_for_evaluation
from flip.training.launch import register_resolvers
from flip.training.module import FlipLitModule, module_options
from flip.training.preemption import Preemption
from flip.training.resume import AUTO, PerRankSeed, resolve_ckpt_path

log = logging.getLogger(__name__)

REQUIRED_GROUPS = ("model", "loss", "optim", "data", "trainer", "paths")


def validate(cfg: DictConfig) -> None:
    """Fail before any work on what Hydra's own checks cannot see."""
    missing = [group for group in REQUIRED_GROUPS if group not in cfg]
    if missing:
        raise ValueError(
            f"config lacks the groups {missing}; a training config needs {list(REQUIRED_GROUPS)}"
        )
    if cfg.ckpt_path not in (None, AUTO) and not os.path.exists(cfg.ckpt_path):  # DeepSpeed's is a folder
        raise FileNotFoundError(
            f"ckpt_path={cfg.ckpt_path!r} does not exist; give a .ckpt written by train.py, or "
            "ckpt_path=auto to resume from the run folder's newest checkpoint (none: start afresh)"
        )
    warmup = cfg.optim.warmup_steps
    if warmup < 0 or cfg.optim.lr <= 0:
        raise ValueError(f"optim.lr={cfg.optim.lr} must be > 0 and optim.warmup_steps={warmup} >= 0")
    _check_eval_data(cfg)


def _benchmark_root(eval_cfg: DictConfig, datamodule: ShardDataModule) -> str | None:
    """The generated FaceShapes the run trained on, when the evaluated benchmark is FaceShapes."""
    if eval_cfg.get("name") == "faceshapes" and isinstance(datamodule, FaceShapesDataModule):
        return str(datamodule.root)
    return None


def _check_eval_data(cfg: DictConfig) -> None:
    """Fail before training, not after it, when the evaluation would have nothing to read."""
    eval_cfg = cfg.get("eval")
    if not cfg.get("evaluate") or eval_cfg is None or eval_cfg.get("test_shards") is not None:
        return
    trains_on_faceshapes = str(cfg.data.get("_target_", "")).endswith("FaceShapesDataModule")
    if eval_cfg.get("name") == "faceshapes" and not trains_on_faceshapes:
        root = Path(eval_cfg.root)
        if not (root / "manifest.json").is_file():
            raise ValueError(
                f"evaluate=true evaluates on FaceShapes, but data={cfg.data._target_} does not generate "
                f"it and eval.root={str(root)!r} holds none; set eval.test_shards to labelled shards, "
                "generate FaceShapes there (python -m flip.data.faceshapes.generate), or evaluate=false"
            )


def evaluate_model(
    model: FlipModel,
    eval_cfg: DictConfig,
    datamodule: ShardDataModule,
    output_dir: Path,
    checkpoint: str | None,
) -> dict[str, Any]:
    """Zero-shot (output_dir/metrics.json) and linear-probe (output_dir/linear_probe/) evaluation.

    The test features are extracted once and serve both protocols.
    """
    model.eval()
    root = _benchmark_root(eval_cfg, datamodule)
    batch, workers = eval_cfg.batch_size, eval_cfg.num_workers
    if eval_cfg.get("test_shards") is not None:
        questions = {q: list(c) for q, c in (eval_cfg.get("multiclass") or {}).items()}
        urls = resolve_shards(eval_cfg.test_shards, "eval.test_shards")
        test_split = read_labelled_shards(
            urls, eval_cfg.split, list(eval_cfg.binary), questions, eval_cfg.name
        )
    else:
        test_split = load_split(eval_cfg, eval_cfg.split, root=root)
    test = split_features(model, test_split, batch_size=batch, num_workers=workers)
    zeroshot = evaluate_zeroshot(model, test, benchmark_prompts(eval_cfg), checkpoint)
    write_report(zeroshot, output_dir)
    results = {"zeroshot": zeroshot}
    probe_cfg = eval_cfg.get("linear_probe")
    if probe_cfg is not None and probe_cfg.enabled:
        seed = probe_cfg.seed
        train_split = load_split(eval_cfg, eval_cfg.train_split, probe_cfg.max_train, seed, root=root)
        train = split_features(model, train_split, batch_size=batch, num_workers=workers)
        val = None
        if eval_cfg.get("val_split"):
            val_split = load_split(eval_cfg, eval_cfg.val_split, probe_cfg.max_val, seed, root=root)
            val = split_features(model, val_split, batch_size=batch, num_workers=workers)
        device = next(model.parameters()).device
        results["linear_probe"] = probe_metrics(train, test, val, probe_cfg, checkpoint, device)
        write_report(results["linear_probe"], output_dir / "linear_probe")
    return results


def _eval_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The zero-shot benchmark during training, when eval.during_training.every_n_steps > 0."""
    during = cfg.get("eval", {}).get("during_training")
    if not during or not during.get("every_n_steps"):
        return []
    return [
        ZeroShotBenchmark(
            cfg.eval,
            every_n_steps=during.every_n_steps,
            split=during.split,
            max_samples=during.max_samples,
            batch_size=cfg.eval.batch_size,
            root=cfg.data.root
            if str(cfg.data.get("_target_", "")).endswith("FaceShapesDataModule")
            else None,
        )
    ]


def _single_console_log() -> None:
    """Lightning adds a console handler of its own; beside Hydra's root handler every line printed twice."""
    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model; returns the last logged metrics and, if run, the evaluation."""
    register_resolvers()
    validate(cfg)
    _single_console_log()
    L.seed_everything(cfg.seed, workers=True)
    module = FlipLitModule(cfg.model, cfg.loss, cfg.optim, **module_options(cfg))
    datamodule: ShardDataModule = instantiate(cfg.data)
    datamodule.use_model(module.model)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()] + _eval_callbacks(cfg)
    callbacks += [PerRankSeed(cfg.seed), Preemption()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()]
    )
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    results: dict[str, Any] = {"train": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    if cfg.get("evaluate") and trainer.is_global_zero:
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", None) or None
        output_dir = Path(cfg.paths.output_dir) / "eval"
        model, checkpoint = model_for_evaluation(module, checkpoint)  # one fp32 file after ZeRO
        evaluation = evaluate_model(model, cfg.eval, datamodule, output_dir, checkpoint)
        results["eval"] = evaluation["zeroshot"]
        if "linear_probe" in evaluation:
            results["linear_probe"] = evaluation["linear_probe"]
        log.info(
            "evaluation written to %s (zero-shot) and %s",
            output_dir / "metrics.json",
            output_dir / "linear_probe",
        )
    return results
