"""Lightning callbacks for evaluation during training."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch

from flip import evaluation
from flip.evaluation.benchmark import Benchmark
from flip.evaluation.zeroshot import ZeroShot
from flip.models import FlipModel

log = logging.getLogger(__name__)


class ZeroShotBenchmark(L.Callback):
    """Runs a zero-shot benchmark every `every_n_steps` training steps and logs its summary.

    `benchmark` is a Benchmark or a benchmark config (conf/benchmark/<name>.yaml: its `reader`
    and prompts), evaluated through flip.evaluation.evaluate like any other evaluation;
    `max_samples` keeps each run to seconds (a seeded subset, the same every time, so the
    curve shows the model changing, not the sample, and read once). Logs through the trainer's
    loggers as `<prefix>/<metric>` at the current step, from global rank 0.

    Every rank runs the same evaluation, in step: under DeepSpeed ZeRO-3 each rank holds a
    shard of the weights, and gathering them is a collective that one rank alone would wait on
    forever. The images take the weights' dtype (bf16 under DeepSpeed's mixed precision).
    """

    def __init__(
        self,
        benchmark: Benchmark | Mapping[str, Any],
        every_n_steps: int,
        split: str | None = None,
        max_samples: int | None = 500,
        batch_size: int = 256,
        num_workers: int = 0,
        prefix: str = "zeroshot",
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1")
        if not isinstance(benchmark, Benchmark):
            benchmark = Benchmark.from_config(benchmark)
        self.benchmark = benchmark
        self.every_n_steps = every_n_steps
        self.split = split or benchmark.test_split
        self.max_samples, self.batch_size, self.num_workers = max_samples, batch_size, num_workers
        self.prefix = prefix
        self.history: list[tuple[int, dict[str, float]]] = []

    def evaluate(self, model: FlipModel) -> dict[str, float]:
        """The benchmark's summary for `model` now (numbers only, as loggers want them)."""
        metrics = evaluation.evaluate(
            model,
            self.benchmark,
            {"zeroshot": ZeroShot()},
            split=self.split,
            max_samples=self.max_samples,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            progress=False,  # inside the training loop's live display
        )["zeroshot"]
        summary = {k: float(v) for k, v in metrics["summary"].items()}
        for k, v in metrics.get("retrieval", {}).items():
            summary[k] = float(v)
        binding = metrics.get("binding") or {}
        if binding.get("accuracy") is not None:  # captions against their one-attribute foils
            summary["binding_accuracy"] = float(binding["accuracy"])
        return summary

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps != 0:
            return
        if self.history and self.history[-1][0] == step:  # several batches per step (accumulation)
            return
        with whole_weights(getattr(trainer, "strategy", None), pl_module.model):
            summary = self.evaluate(pl_module.model)
        self.history.append((step, summary))
        if not trainer.is_global_zero:
            return
        logged = {f"{self.prefix}/{k}": v for k, v in summary.items()}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        headline = summary.get("mean_balanced_accuracy", summary.get("accuracy"))
        log.info("step %d: zero-shot %s %s = %.3f", step, self.benchmark.name, self.split, headline)


@contextmanager
def whole_weights(strategy: Any, model: torch.nn.Module) -> Iterator[None]:
    """The model's weights whole on this rank while the block runs; call it on every rank.

    Under ZeRO-3 the weights are gathered from all ranks (a collective) and partitioned again
    after; with every other strategy each rank already holds them.
    """
    if not getattr(strategy, "zero_stage_3", False):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield
