"""What a protocol predicted on a multitask split (UTKFace, FairFace) and the metrics of it.

The linear probe and zero-shot predict the same things by different means: a class per
question (gender, race, age group) and a number per value (age). Both hand their predictions
to `MultitaskPredictions`, so the summary, the per-question and per-value details and the
per-subgroup figures (flip.evaluation.subgroups) are computed by one piece of code, over all
samples or over any subset of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flip.evaluation.metrics import classification_scores, multiclass_metrics, regression_metrics


@dataclass
class QuestionPredictions:
    """One multi-class question: its classes, the labels ([N], -1 unlabelled) and the predicted classes."""

    classes: list[str]
    true: np.ndarray
    predicted: np.ndarray


@dataclass
class ValuePredictions:
    """One regression value: labels ([N], NaN unlabelled; None where a benchmark labels buckets
    only, as FairFace does ages) and predictions; `buckets` optionally scores the predictions'
    buckets against labelled buckets: (bucket names, true [N] with -1 unlabelled, predicted [N])."""

    true: np.ndarray | None
    predicted: np.ndarray
    buckets: tuple[list[str], np.ndarray, np.ndarray] | None = None


@dataclass
class MultitaskPredictions:
    questions: dict[str, QuestionPredictions] = field(default_factory=dict)
    values: dict[str, ValuePredictions] = field(default_factory=dict)

    def scores(self, mask: np.ndarray | None = None) -> dict[str, float]:
        """The summary metrics over the samples of `mask` (all when None): per question
        `<q>_accuracy` and `<q>_mean_per_class_recall`, per value `<v>_mae` and `<v>_cs5`,
        and `<v>_bucket_accuracy` where buckets are scored; unlabelled samples left out."""
        out: dict[str, float] = {}
        for name, q in self.questions.items():
            keep = _select(q.true >= 0, mask)
            m = multiclass_metrics(q.true[keep], q.predicted[keep], q.classes)
            out[f"{name}_accuracy"] = m["accuracy"]
            out[f"{name}_mean_per_class_recall"] = m["mean_per_class_recall"]
        for name, v in self.values.items():
            if v.true is not None:
                keep = _select(np.isfinite(v.true), mask)
                m = regression_metrics(v.true[keep], v.predicted[keep])
                out[f"{name}_mae"], out[f"{name}_cs5"] = m["mae"], m["cs5"]
            if v.buckets is not None:
                _, true, predicted = v.buckets
                keep = _select(true >= 0, mask)
                out[f"{name}_bucket_accuracy"] = (
                    float((true[keep] == predicted[keep]).mean()) if keep.any() else float("nan")
                )
        return out

    def multiclass(self) -> dict[str, dict[str, Any]]:
        """Per question: accuracy, mean per-class recall, per-class recall/support, confusion matrix."""
        out = {}
        for name, q in self.questions.items():
            keep = q.true >= 0
            m = multiclass_metrics(q.true[keep], q.predicted[keep], q.classes)
            m["confusion_matrix"] = classification_scores(q.true[keep], q.predicted[keep], q.classes)[2]
            out[name] = m
        return out

    def regression(self) -> dict[str, dict[str, Any]]:
        """Per value: mae, cs5, n and the labelled (true, predicted) pairs the scatter plot draws;
        bucket_accuracy and bucket_support where buckets are scored."""
        out: dict[str, dict[str, Any]] = {}
        for name, v in self.values.items():
            block: dict[str, Any] = {}
            if v.true is not None:
                keep = np.isfinite(v.true)
                block.update(regression_metrics(v.true, v.predicted))
                block["true"] = _rounded(v.true[keep])
                block["predicted"] = _rounded(v.predicted[keep])
            if v.buckets is not None:
                names, true, predicted = v.buckets
                keep = true >= 0
                block["bucket_accuracy"] = (
                    float((true[keep] == predicted[keep]).mean()) if keep.any() else float("nan")
                )
                block["bucket_support"] = int(keep.sum())
                block["buckets"] = list(names)
            out[name] = block
        return out


def higher_is_better(metric: str) -> bool:
    """Every summary metric but an error (`*_mae`, landmarks' `nme` and failure rates `fr_*`) is
    better when higher; `metric` may be a leaderboard column, `benchmark/protocol/metric`."""
    name = metric.rsplit("/", 1)[-1]
    return not (name.endswith("_mae") or name == "nme" or name.startswith("fr_"))


def _select(labelled: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return labelled if mask is None else labelled & mask


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 3) for v in values]
