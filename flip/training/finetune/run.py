"""What `finetune.py` does with a composed config: fine-tune, export, evaluate.

The same machinery as pretraining (flip.training.run): Lightning's Trainer from conf/trainer,
the checkpoint callback of conf/callbacks with atomic saves, `ckpt_path` (a file or `auto`)
for exact resume, preemption by SIGTERM or Slurm's signal, per-rank seeds. After training, on
global rank 0, the run writes into its folder

    model/            the adapted model (LoRA merged into the weights), a flip.load folder
    head.safetensors  the head's weights; its metadata holds the task and the adaptation
    eval/             metrics.json, report.md and plots on the benchmark's test split
    model_ema/, head_ema.safetensors, eval_ema/   the same of the EMA weights (ema.decay set)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from open_clip.factory import get_model_config
from safetensors.torch import save

from flip.atomic import atomic_file
from flip.checkpoint import load, weights_loaded_after
from flip.config import plain, register_resolvers
from flip.evaluation.benchmark import Benchmark
from flip.evaluation.finetuned import FinetunedHead
from flip.evaluation.run import evaluate
from flip.evaluation.tasks import Task
from flip.export import export
from flip.models import FlipModel, build_model
from flip.models.pretrained import INIT_KEYS, load_tower
from flip.training.checkpoint_io import AtomicCheckpointIO
from flip.training.deepspeed import consolidate, is_zero_checkpoint
from flip.training.finetune.adapt import Adaptation
from flip.training.finetune.data import FinetuneDataModule
from flip.training.finetune.ema import EMA
from flip.training.finetune.module import FinetuneLitModule, build_task
from flip.training.finetune.resolution import check_image_size, resized
from flip.training.module import zero_stage
from flip.training.preemption import Preemption
from flip.training.resume import AUTO, PerRankSeed, resolve_ckpt_path
from flip.training.run import check_numbers, single_console_log

log = logging.getLogger(__name__)

INTEGER, NUMBER = (int,), (int, float)
NUMERIC_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {  # key: (accepted types, null allowed)
    "seed": (INTEGER, False), "trainer.max_steps": (INTEGER, False), "trainer.max_epochs": (INTEGER, True),
    "trainer.log_every_n_steps": (INTEGER, False), "trainer.accumulate_grad_batches": (INTEGER, False),
    "trainer.check_val_every_n_epoch": (INTEGER, True), "trainer.val_check_interval": (NUMBER, True),
    "data.batch_size": (INTEGER, False), "data.val_batch_size": (INTEGER, False),
    "data.num_workers": (INTEGER, False),
    "data.max_train": (INTEGER, True), "data.max_val": (INTEGER, True),
    "optim.lr": (NUMBER, False), "optim.weight_decay": (NUMBER, False), "optim.eps": (NUMBER, False),
    "optim.warmup_steps": (NUMBER, False), "optim.min_lr_ratio": (NUMBER, False),
    "optim.layer_decay": (NUMBER, False), "ema.decay": (NUMBER, True),
    "ema.every_n_steps": (INTEGER, False), "ema.start_step": (INTEGER, False),
    "eval.batch_size": (INTEGER, False), "eval.num_workers": (INTEGER, False),
    "eval.max_samples": (INTEGER, True), "image_size": (INTEGER, True),
}  # fmt: skip


def check_settings(cfg: DictConfig) -> None:
    """Fail before any work on settings Hydra cannot check; reads no file (the docs' commands use it)."""
    check_numbers(cfg, NUMERIC_KEYS)
    check_image_size(cfg.image_size, None if cfg.ckpt is not None else _vision_config(plain(cfg.model)))
    Adaptation.from_config(plain(cfg.adapt))
    target = cfg.task.get("_target_")
    if not target or not issubclass(get_class(target), Task):
        raise ValueError(f"task._target_={target!r} must name a flip.evaluation.tasks.Task (conf/task/)")
    if cfg.optim.lr <= 0 or cfg.optim.warmup_steps < 0:
        raise ValueError(
            f"optim.lr={cfg.optim.lr} must be > 0 and optim.warmup_steps={cfg.optim.warmup_steps} >= 0"
        )
    if not 0.0 < cfg.optim.layer_decay <= 1.0:
        raise ValueError(f"optim.layer_decay={cfg.optim.layer_decay} must be in (0, 1]; 1: one rate for all")
    stage = zero_stage(cfg.trainer)
    if stage == 3:
        raise ValueError(
            "fine-tuning under DeepSpeed ZeRO-3 is not supported (the export merges and evaluates whole "
            "weights on one rank); use trainer=deepspeed_zero2, ddp or cpu"
        )
    if stage is not None and cfg.ema.decay is not None:
        raise ValueError(
            f"ema.decay={cfg.ema.decay} under DeepSpeed: the average would be of DeepSpeed's working copy "
            "of the weights (bf16), not of its fp32 master weights; set ema.decay=null or use trainer=ddp"
        )
    if cfg.benchmark.get("train_split") is None:
        raise ValueError(
            f"benchmark={cfg.benchmark.name} has no train split (train_split: null): nothing to fine-tune on"
        )


def _vision_config(recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The image tower's architecture as configured (`model.arch`, or open_clip's for a built-in name);
    None for an `hf-hub:` / `local-dir:` model, whose config is a download or a file away."""
    name = str(recipe.get("name"))
    arch = recipe.get("arch") or (None if ":" in name else get_model_config(name))
    return (arch or {}).get("vision_cfg")


def _check_files(cfg: DictConfig) -> None:
    if cfg.ckpt is not None and not os.path.exists(cfg.ckpt):
        raise FileNotFoundError(
            f"ckpt={cfg.ckpt!r} does not exist; give the model to fine-tune: a train.py checkpoint "
            "(<run>/checkpoints/last.ckpt) or an exported folder, or ckpt=null for `model` as configured"
        )
    if cfg.ckpt_path not in (None, AUTO) and not os.path.exists(cfg.ckpt_path):
        raise FileNotFoundError(
            f"ckpt_path={cfg.ckpt_path!r} does not exist; give a checkpoint this fine-tune wrote "
            "(<run>/checkpoints/last.ckpt), or ckpt_path=auto"
        )


def initial_model(cfg: DictConfig) -> FlipModel:
    """The model fine-tuning starts from: `ckpt` (flip.load), else `model` (its towers' init sources)."""
    if cfg.ckpt is not None:
        return load(cfg.ckpt)
    recipe = plain(cfg.model)
    model = build_model(**{k: v for k, v in recipe.items() if k not in INIT_KEYS.values()})
    for tower, key in INIT_KEYS.items():
        if recipe.get(key):
            load_tower(model, tower, recipe[key])
    return model


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune as configured; returns the last logged metrics and, on rank 0, each evaluation."""
    register_resolvers()
    check_settings(cfg)
    _check_files(cfg)
    single_console_log()
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    with weights_loaded_after() if ckpt_path else contextlib.nullcontext():  # resumed: not the init's
        model = resized(initial_model(cfg), cfg.image_size)  # a resumed run's weights fit the new size
    benchmark = Benchmark.from_config(cfg.benchmark)
    train = benchmark.load(benchmark.train_split, cfg.data.max_train, cfg.seed)
    val = benchmark.load(benchmark.val_split, cfg.data.max_val, cfg.seed) if benchmark.val_split else None
    task = {**plain(cfg.task), **build_task(plain(cfg.task)).bind(train)}
    task.update(build_task(task).settle(model))
    module = FinetuneLitModule(model, task, cfg.adapt, cfg.optim)
    if val is not None:
        module.task.check(val)
    augment = cfg.data.augment and module.task.augments
    if cfg.data.augment and not augment:
        log.info("task=%s trains without augmentation: random crops would move its labels", module.task.kind)
    datamodule = FinetuneDataModule(
        train, val, module.task.targets,
        model.preprocess_train if augment else model.preprocess, model.preprocess,
        cfg.data.batch_size, cfg.data.val_batch_size, cfg.data.num_workers, cfg.seed, module.task.images,
    )  # fmt: skip
    ema = EMA(**plain(cfg.ema)) if cfg.ema.decay is not None else None
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    callbacks += [c for c in (ema, PerRankSeed(cfg.seed), Preemption()) if c is not None]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()]
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    results: dict[str, Any] = {"train": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    if trainer.is_global_zero:
        _whole_fp32_weights(module, trainer)
        finals = {"": module} | ({"_ema": ema.averaged()} if ema is not None else {})
        for suffix, final in finals.items():
            results.update(_export_and_evaluate(cfg, benchmark, final, suffix, len(train)))
    return results


def _whole_fp32_weights(module: FinetuneLitModule, trainer: L.Trainer) -> None:
    """After a DeepSpeed run the weights in memory are its working copy: reload the fp32 ones."""
    last = getattr(trainer.checkpoint_callback, "last_model_path", None)
    if not last or not is_zero_checkpoint(last):
        return
    single = str(Path(last).with_suffix("")) + ".fp32.ckpt"
    module.float().load_state_dict(consolidate(last, single)["state_dict"])


def _export_and_evaluate(
    cfg: DictConfig, benchmark: Benchmark, final: FinetuneLitModule, suffix: str, n_train: int
) -> dict[str, Any]:
    """model<suffix>/ and head<suffix>.safetensors, and eval<suffix>/ when `evaluate` is set."""
    run = Path(cfg.paths.output_dir)
    merged = final.adaptation.merged(final.model)
    export(merged, run / f"model{suffix}", "safetensors", overwrite=True)
    described = {
        "task": json.dumps(final.hparams.task),
        "adaptation": json.dumps(final.adaptation.describe()),
    }
    head = {k: v.detach().cpu().contiguous() for k, v in final.head.state_dict().items()}
    with atomic_file(run / f"head{suffix}.safetensors") as f:
        f.write(save(head, metadata=described))
    if not cfg.evaluate:
        return {}
    protocol = FinetunedHead(
        final.task, final.head, final.adaptation.describe(), "ema" if suffix else "raw", n_train
    )
    metrics = evaluate(
        merged.to(final.device), benchmark, {"finetune": protocol}, run / f"eval{suffix}",
        split=cfg.eval.split, max_samples=cfg.eval.max_samples, checkpoint=str(run / f"model{suffix}"),
        batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers,
    )  # fmt: skip
    return {f"eval{suffix}": metrics["finetune"]}
