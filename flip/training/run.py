"""What `train.py` does with a composed config: build, fit, then evaluate the result.

Kept apart from the Hydra decorator so tests (and other programs) can call it with a config
they composed themselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flip.benchmarks.shards import read_labelled_shards
from flip.checkpoint import weights_loaded_after
from flip.config import register_resolvers
from flip.data.datamodule import FaceShapesDataModule, ShardDataModule, resolve_shards
from flip.evaluation.features import split_features
from flip.evaluation.report import write_report
from flip.evaluation.runner import benchmark_prompts, load_split, probe_metrics
from flip.evaluation.zeroshot import evaluate_zeroshot
from flip.models import FlipModel
from flip.training.callbacks import ZeroShotBenchmark
from flip.training.checkpoint_io import AtomicCheckpointIO
from flip.training.deepspeed import model_for_evaluation
from flip.training.module import FlipLitModule, check_compile_strategy, module_options, zero_stage
from flip.training.preemption import Preemption
from flip.training.resume import AUTO, PerRankSeed, resolve_ckpt_path
from flip.training.sweeps import check_sweep_launch

log = logging.getLogger(__name__)

REQUIRED_GROUPS = ("model", "loss", "optim", "data", "trainer", "paths")

_INT, _NUMBER = (int,), (int, float)
_ABSENT = object()
# Numeric settings, checked before anything is built: Hydra reads `trainer.max_steps=abc` as a
# string, and Lightning or the loader would fail much later with a TypeError that names no key.
NUMERIC_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {  # key: (accepted types, null allowed)
    "seed": (_INT, False), "micro_batches": (_INT, False), "max_nonfinite_steps": (_INT, False),
    "trainer.max_steps": (_INT, False), "trainer.max_epochs": (_INT, True),
    "trainer.num_nodes": (_INT, False),
    "trainer.log_every_n_steps": (_INT, False), "trainer.accumulate_grad_batches": (_INT, False),
    "trainer.check_val_every_n_epoch": (_INT, True), "trainer.val_check_interval": (_NUMBER, True),
    "trainer.gradient_clip_val": (_NUMBER, True), "trainer.num_sanity_val_steps": (_INT, False),
    "trainer.limit_train_batches": (_NUMBER, True), "trainer.limit_val_batches": (_NUMBER, True),
    "data.batch_size": (_INT, False), "data.val_batch_size": (_INT, True), "data.num_workers": (_INT, False),
    "data.samples_per_epoch": (_INT, True), "data.shuffle_buffer": (_INT, False),
    "data.num_train": (_INT, False), "data.num_val": (_INT, False), "data.num_test": (_INT, False),
    "data.samples_per_shard": (_INT, False), "data.image_size": (_INT, False),
    "data.generator_workers": (_INT, False), "data.generator_seed": (_INT, False),
    "optim.lr": (_NUMBER, False), "optim.weight_decay": (_NUMBER, False), "optim.eps": (_NUMBER, False),
    "optim.warmup_steps": (_NUMBER, False), "optim.min_lr_ratio": (_NUMBER, False),
    "optim.lr_image": (_NUMBER, True), "optim.lr_text": (_NUMBER, True),
    "optim.lock_image_unlocked_groups": (_INT, False), "optim.lock_text_unlocked_layers": (_INT, False),
}  # fmt: skip


def check_numbers(cfg: DictConfig) -> None:
    """Every numeric setting present in `cfg` is a number of the right kind; the error names them all."""
    wrong = []
    for key, (types, nullable) in NUMERIC_KEYS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or (value is None and nullable):
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            kind = "an integer" if types == _INT else "a number"
            wrong.append(
                f"{key}={value!r} ({type(value).__name__}) must be {kind}{' or null' if nullable else ''}"
            )
    if wrong:
        raise ValueError("config values of the wrong type: " + "; ".join(wrong))


def validate(cfg: DictConfig) -> None:
    """Fail before any work on what Hydra's own checks cannot see."""
    missing = [group for group in REQUIRED_GROUPS if group not in cfg]
    if missing:
        raise ValueError(
            f"config lacks the groups {missing}; a training config needs {list(REQUIRED_GROUPS)}"
        )
    check_numbers(cfg)
    if cfg.ckpt_path not in (None, AUTO) and not os.path.exists(cfg.ckpt_path):  # DeepSpeed's is a folder
        raise FileNotFoundError(
            f"ckpt_path={cfg.ckpt_path!r} does not exist; give a .ckpt written by train.py, or "
            "ckpt_path=auto to resume from the run folder's newest checkpoint (none: start afresh)"
        )
    warmup = cfg.optim.warmup_steps
    if warmup < 0 or cfg.optim.lr <= 0:
        raise ValueError(f"optim.lr={cfg.optim.lr} must be > 0 and optim.warmup_steps={warmup} >= 0")
    check_compile_strategy(cfg.get("compile"), zero_stage(cfg.trainer))
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
    """Fit the configured model; returns the last logged metrics and, if run, the evaluation.

    A run stopped by SIGTERM or Slurm's requeue signal raises `flip.training.preemption.Preempted`
    (a SystemExit with code 128 + the signal) after saving `last.ckpt`, on every rank.
    """
    register_resolvers()
    validate(cfg)
    _single_console_log()
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    with weights_loaded_after() if ckpt_path else contextlib.nullcontext():  # resumed: not random
        module = FlipLitModule(cfg.model, cfg.loss, cfg.optim, **module_options(cfg))
    datamodule: ShardDataModule = instantiate(cfg.data)
    datamodule.use_model(module.model)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()] + _eval_callbacks(cfg)
    callbacks += [PerRankSeed(cfg.seed), Preemption()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()]
    )
    check_sweep_launch(trainer)
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
