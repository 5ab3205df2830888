"""Classification metrics, computed from label/prediction arrays with no framework magic."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | int]:
    """Accuracy, balanced accuracy (mean of the two class recalls) and support.

    Balanced accuracy is the headline number because face attributes are imbalanced: a model
    that always answers "no eyeglasses" scores 0.5 here however rare eyeglasses are.
    A class absent from `y_true` is left out of the mean rather than counted as 0 or 1.
    """
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    recalls = [float((y_pred[y_true == c] == c).mean()) for c in (True, False) if (y_true == c).any()]
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
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
