"""Image <-> text retrieval on a captioned split: Recall@k in both directions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flip.evaluation.features import BenchmarkFeatures, SplitFeatures, extract_text_features
from flip.models import FlipModel

RECALL_AT = (1, 5, 10)


def retrieval_recalls(
    image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = RECALL_AT
) -> dict[str, float]:
    """Recall@k of the paired caption (image->text) and image (text->image); pair i is (image i, text i).

    A tie with the true pair counts in its favour (only strictly better candidates rank ahead).
    """
    similarity = image_features @ text_features.T
    truth = torch.arange(len(similarity))
    out = {}
    for direction, sim in (("i2t", similarity), ("t2i", similarity.T)):
        rank = (sim > sim[truth, truth][:, None]).sum(dim=1)  # how many beat the true pair
        for k in ks:
            out[f"{direction}_R@{k}"] = float((rank < k).float().mean())
    return out


def evaluate_retrieval(
    model: FlipModel, features: SplitFeatures, checkpoint: str | None = None, batch_size: int = 256
) -> dict[str, Any]:
    """Retrieval metrics of a captioned split, in the metrics.json schema."""
    split = features.split
    if split.captions is None:
        raise ValueError(
            f"{split.benchmark}/{split.split} has no captions; retrieval needs a captioned split "
            "(faceshapes, labelled shards, or a csv benchmark with a 'caption' column)"
        )
    text_features = extract_text_features(model, split.captions, batch_size)
    return {
        "benchmark": split.benchmark,
        "protocol": "retrieval",
        "task": "retrieval",
        "checkpoint": checkpoint,
        "split": split.split,
        "n_train": 0,
        "n_test": len(split),
        "labels": [],
        "summary": retrieval_recalls(features.features, text_features),
        "per_label": {},
    }


@dataclass
class Retrieval:
    """The retrieval protocol (conf/protocol/retrieval.yaml): Recall@k on the evaluated split's captions."""

    def __call__(
        self, model: FlipModel, features: BenchmarkFeatures, checkpoint: str | None = None
    ) -> dict[str, Any]:
        return evaluate_retrieval(model, features(), checkpoint, features.batch_size)
