"""Classification and regression metrics, computed from label/prediction arrays with no framework magic."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | int]:
    """Accuracy, balanced accuracy (mean of the two class recalls), each recall, and support.

    Balanced accuracy is the headline number because face attributes are imbalanced: a model
    that always answers "no eyeglasses" scores 0.5 here however rare eyeglasses are.
    A class absent from `y_true` is left out of the mean rather than counted as 0 or 1 (its
    recall is nan). The two recalls say how a balanced accuracy is made: two thirds can be a
    model right on two faces in three of each kind, or one right on nearly every face with the
    attribute and a third of those without, which says "with" too readily, as zero-shot prompt
    pairs do when the captions they were trained on name an attribute mostly where it is present.
    """
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    recall = {
        c: float((y_pred[y_true == c] == c).mean()) if (y_true == c).any() else float("nan")
        for c in (True, False)
    }
    present = [r for r in recall.values() if not np.isnan(r)]
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
        "recall_positive": recall[True],
        "recall_negative": recall[False],
        "support": len(y_true),
        "positives": int(y_true.sum()),
    }


def multiclass_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, mean per-class recall over the classes present, and per-class recall/support."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    per_class = {}
    for index, name in enumerate(classes):
        mask = y_true == index
        per_class[name] = {
            "recall": float((y_pred[mask] == index).mean()) if mask.any() else float("nan"),
            "support": int(mask.sum()),
        }
    present = [v["recall"] for v in per_class.values() if v["support"] > 0]
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "mean_per_class_recall": float(np.mean(present)) if present else float("nan"),
        "support": len(y_true),
        "per_class": per_class,
    }


def attribute_scores(
    y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str]
) -> tuple[dict[str, float], dict[str, dict]]:
    """Summary (mean accuracy, mean balanced accuracy) and per-attribute metrics of [N, A] decisions.

    `y_true` holds 1 / 0, or -1 where a sample is unlabelled for that attribute: such entries
    are left out of that attribute's metrics only.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred, dtype=bool)
    per_label = {}
    for a, name in enumerate(names):
        labelled = y_true[:, a] >= 0
        per_label[name] = binary_metrics(y_true[labelled, a] == 1, y_pred[labelled, a])
    summary = {
        "mean_accuracy": _nanmean([m["accuracy"] for m in per_label.values()]),
        "mean_balanced_accuracy": _nanmean([m["balanced_accuracy"] for m in per_label.values()]),
    }
    return summary, per_label


def classification_scores(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]
) -> tuple[dict[str, float], dict[str, dict], list[list[int]]]:
    """Summary (accuracy, mean per-class recall), per-class recall/support and the confusion matrix.

    The confusion matrix has true classes as rows and predictions as columns.
    """
    m = multiclass_metrics(y_true, y_pred, classes)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    summary = {"accuracy": m["accuracy"], "mean_per_class_recall": m["mean_per_class_recall"]}
    return summary, m["per_class"], confusion.tolist()


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | int]:
    """Mean absolute error and CS@5 (the share of predictions at most 5 off, years for age) over
    the samples with a finite label: the two figures the age-estimation papers report."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    labelled = np.isfinite(y_true)
    error = np.abs(y_pred[labelled] - y_true[labelled])
    return {
        "mae": float(error.mean()) if error.size else float("nan"),
        "cs5": float((error <= 5.0).mean()) if error.size else float("nan"),
        "n": int(error.size),
    }
