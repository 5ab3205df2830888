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
from omegaconf.errors import OmegaConfBaseException

from flip.checkpoint import weights_loaded_after
from flip.config import check_moved_keys_in, register_resolvers
from flip.data.datamodule import ShardDataModule
from flip.evaluation.benchmark import Benchmark
from flip.evaluation.run import evaluate_config
from flip.training.callbacks import ZeroShotBenchmark
from flip.training.checkpoint_io import AtomicCheckpointIO
from flip.training.deepspeed import model_for_evaluation
from flip.training.module import (
    FlipLitModule,
    check_compile_strategy,
    check_foils_used,
    check_loss_strategy,
    module_options,
    zero_stage,
)
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


def check_numbers(cfg: DictConfig, keys: dict[str, tuple[tuple[type, ...], bool]] | None = None) -> None:
    """Every numeric setting of `keys` (default: train.py's) present in `cfg` is a number of the
    right kind; the error names them all."""
    wrong = []
    for key, (types, nullable) in (NUMERIC_KEYS if keys is None else keys).items():
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
    check_loss_strategy(cfg.loss, zero_stage(cfg.trainer))
    check_foils_used(cfg.loss, cfg.data.get("hard_negatives"))
    check_moved_keys_in(cfg)  # the command line was checked before composing
    _check_eval_data(cfg)


def _check_eval_data(cfg: DictConfig) -> None:
    """Fail before training, not after it, when the evaluation would have nothing to read.

    The evaluated split is read now, unless the run writes it: a benchmark root that is the
    training data's own (the demo evaluates on the FaceShapes it generates) is made during fit.
    """
    eval_cfg = cfg.get("eval")
    if not cfg.get("evaluate") or eval_cfg is None or eval_cfg.get("test_shards") is not None:
        return
    root = OmegaConf.select(eval_cfg, "benchmark.root", throw_on_resolution_failure=False)
    if root is not None and root == OmegaConf.select(cfg, "data.root", default=None):
        return
    split = eval_cfg.get("split") or eval_cfg.benchmark.test_split
    try:
        Benchmark.from_config(eval_cfg.benchmark).load(split)
    except (OSError, ValueError, OmegaConfBaseException) as exc:  # e.g. ${data.root} with data=shards
        raise ValueError(
            f"evaluate=true evaluates {eval_cfg.benchmark.name}/{split}, but this run does not generate "
            f"it and eval.benchmark.root={root!r} cannot be read ({exc}); point eval.benchmark.root at "
            "it, set eval.test_shards to labelled shards, or evaluate=false"
        ) from exc


def _eval_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The zero-shot benchmark during training, when eval.during_training.every_n_steps > 0."""
    during = cfg.get("eval", {}).get("during_training")
    if not during or not during.get("every_n_steps"):
        return []
    return [
        ZeroShotBenchmark(
            cfg.eval.benchmark,
            every_n_steps=during.every_n_steps,
            split=during.split,
            max_samples=during.max_samples,
            batch_size=cfg.eval.batch_size,
        )
    ]


def single_console_log() -> None:
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
    single_console_log()
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
        evaluation = evaluate_config(model, cfg.eval, output_dir, checkpoint=checkpoint)
        # the first protocol's metrics (<run>/eval/metrics.json) are "eval", the others by name
        first, *others = evaluation
        results["eval"] = evaluation[first]
        results.update({name: evaluation[name] for name in others})
    return results
