"""Zero-shot attribute evaluation over labelled shards (FaceShapes writes labels in `.json`).

The general protocol lives in flip.evaluation.zeroshot (any benchmark split); this module
keeps the shard-based entry used on FaceShapes, and `score_attributes` for metadata dicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from flip.benchmarks.shards import read_labelled_shards
from flip.evaluation.features import split_features
from flip.evaluation.metrics import binary_metrics, multiclass_metrics
from flip.evaluation.report import write_report
from flip.evaluation.retrieval import retrieval_recalls
from flip.evaluation.zeroshot import ZeroShotClassifier, evaluate_zeroshot
from flip.models import FlipModel

__all__ = ["evaluate_zeroshot_attributes", "retrieval_recalls", "score_attributes", "write_report"]


def _labels(metadata: list[dict], name: str, classes: Sequence[str] | None = None) -> np.ndarray:
    """Binary labels as bools, or class indices (-1 where unlabelled, e.g. a bald head's hair colour)."""
    values = [meta.get(name) for meta in metadata]
    if classes is None:
        if any(v is None for v in values):
            raise ValueError(f"attribute {name!r} is missing from some samples' .json metadata")
        return np.asarray(values, dtype=bool)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in values if v is not None and v not in index})
    if unknown:
        raise ValueError(
            f"attribute {name!r} has values {unknown} outside the prompted classes {list(classes)}"
        )
    return np.asarray([-1 if v is None else index[v] for v in values])


def score_attributes(
    classifier: ZeroShotClassifier, image_features: torch.Tensor, metadata: list[dict]
) -> dict[str, Any]:
    """Per-attribute and mean metrics of the classifier's decisions against metadata dicts."""
    probs = classifier.predict(image_features)
    per_label = {}
    for a, name in enumerate(classifier.binary_names):
        per_label[name] = binary_metrics(_labels(metadata, name), probs["binary"][:, a].numpy() > 0.5)
    multiclass = {}
    for name, (classes, _) in classifier.multiclass.items():
        y = _labels(metadata, name, classes)
        keep = y >= 0
        multiclass[name] = multiclass_metrics(y[keep], probs[name].argmax(dim=-1).numpy()[keep], classes)
    summary = {
        "mean_accuracy": float(np.mean([m["accuracy"] for m in per_label.values()]))
        if per_label
        else math.nan,
        "mean_balanced_accuracy": (
            float(np.mean([m["balanced_accuracy"] for m in per_label.values()])) if per_label else math.nan
        ),
    }
    for name, m in multiclass.items():
        summary[f"{name}_accuracy"] = m["accuracy"]
        summary[f"{name}_mean_per_class_recall"] = m["mean_per_class_recall"]
    return {"labels": list(per_label), "summary": summary, "per_label": per_label, "multiclass": multiclass}


def evaluate_zeroshot_attributes(
    model: FlipModel,
    urls: Sequence[str],
    prompts: Mapping[str, Any],
    benchmark: str,
    split: str,
    checkpoint: str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Zero-shot metrics of labelled shards: the `binary` and `multiclass` questions of `prompts`."""
    questions = {name: list(classes) for name, classes in (prompts.get("multiclass") or {}).items()}
    labelled = read_labelled_shards(urls, split, list(prompts.get("binary") or {}), questions, benchmark)
    features = split_features(model, labelled, batch_size=batch_size, num_workers=num_workers)
    return evaluate_zeroshot(model, features, prompts, checkpoint)
