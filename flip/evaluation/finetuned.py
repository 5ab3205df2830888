"""The protocol of a fine-tuned model: its head's predictions on the evaluated split, scored by its task.

It runs through `flip.evaluation.evaluate` like every protocol, so a fine-tune leaves the
metrics.json, report.md and plots a probe leaves, with two more fields: `adaptation` (how the
tower was adapted: frozen, LoRA of rank r, or full) and `weights` (the raw weights or their EMA).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flip.evaluation.features import BenchmarkFeatures, cached_split, encode_images, model_device, model_dtype
from flip.evaluation.tasks import Task
from flip.models import FlipModel
from flip.models.heads import image_features


@dataclass
class FinetunedHead:
    """`head` on `model`'s image tower, scored by `task`; `adaptation` is the label metrics.json carries
    ({"method": "lora", "rank": 8, "label": "LoRA r=8"}), `weights` "raw" or "ema"."""

    task: Task
    head: nn.Module
    adaptation: Mapping[str, Any] = field(default_factory=dict)
    weights: str = "raw"
    n_train: int | None = None
    examples: int = 6  # faces a dense task draws in its report's figure

    def __call__(
        self, model: FlipModel, features: BenchmarkFeatures, checkpoint: str | None = None
    ) -> dict[str, Any]:
        split = features.benchmark.load(*features.evaluated)
        self.task.check(split)
        head = self.head.to(model_device(model), model_dtype(model)).eval()

        def predict(images: torch.Tensor) -> torch.Tensor:
            return self.task.kept(head(image_features(model.clip.visual, images, head.blocks)))

        def extract() -> tuple[torch.Tensor, list[int]]:
            what = f"{split.benchmark}/{split.split} predictions"
            return encode_images(
                model,
                self.task.images(split),
                predict,
                features.batch_size,
                features.num_workers,
                what,
                features.progress,
                dtype=self.task.kept_dtype,
            )

        predicted = cached_split(split, None, None, extract, {}, "predictions")
        features.requested.append(predicted)  # its unreadable images are counted as any protocol's
        kept = predicted.split
        metrics = {
            "benchmark": kept.benchmark,
            "protocol": "finetune",
            "task": self.task.kind,
            "checkpoint": checkpoint,
            "split": kept.split,
            "n_test": len(kept),
            "labels": self.task.labels,
            "adaptation": dict(self.adaptation),
            "weights": self.weights,
            **self.task.split_scores(predicted.features, kept, self.examples),
        }
        if head.blocks:  # a dense head: what the dense report prints of it
            metrics.update(blocks=list(head.blocks), head=getattr(head, "description", type(head).__name__))
        if self.n_train is not None:
            metrics["n_train"] = self.n_train
        return metrics
