"""Dense metrics: face parsing (F1, IoU) and landmarks (NME, failure rate, AUC), as published.

Parsing, FaRL's scorer: one confusion matrix over all test pixels (rows true, columns
predicted), per class F1 = 2 * diag / (row sum + column sum), the headline the mean F1 over
the foreground classes (every class but background, hair included); IoU = diag / (row sum +
column sum - diag) per class, mIoU over all classes (background included, the segmentation
convention). A class that neither the labels nor the predictions hold has no F1 or IoU: it is
reported as None and left out of the means. Pixels labelled IGNORE (padding) count nowhere.

Landmarks: per face, NME = the mean over points of the point error over the face's
normaliser (each dataset's own: inter-ocular, box size); the headline is its mean over
faces. At a threshold t, the failure rate is the share of faces with NME > t and the AUC the
area under the cumulative error curve from 0 to t, over t: exactly mean(max(0, 1 - NME / t))
(FaRL's scorer integrates the same step curve numerically on a 1e-4 grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flip.benchmarks.dense import IGNORE

BACKGROUND = "background"


def confusion_matrix(
    true: np.ndarray, predicted: np.ndarray, classes: int, ignore: int = IGNORE
) -> np.ndarray:
    """[classes, classes] pixel counts (int64), rows the true class, columns the predicted one;
    pixels whose true label is `ignore` are left out."""
    true, predicted = np.asarray(true).ravel(), np.asarray(predicted).ravel()
    if true.shape != predicted.shape:
        raise ValueError(f"{true.size} true and {predicted.size} predicted pixels")
    keep = true != ignore
    true, predicted = true[keep].astype(np.int64), predicted[keep].astype(np.int64)
    bad = (true < 0) | (true >= classes) | (predicted < 0) | (predicted >= classes)
    if bad.any():
        raise ValueError(
            f"class ids outside 0..{classes - 1} (or {ignore} = ignore): "
            f"{sorted(set(true[bad].tolist()) | set(predicted[bad].tolist()))[:5]}"
        )
    return np.bincount(true * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else float(numerator / denominator)


def parsing_scores(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """`summary` (mean_f1 over foreground classes, miou, pixel_accuracy) and `per_label` (per
    class name: f1, iou, support = true pixels, predicted = predicted pixels) of a confusion matrix."""
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.shape != (len(class_names), len(class_names)):
        raise ValueError(f"a {confusion.shape} confusion matrix for {len(class_names)} classes")
    diag, rows, columns = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    per_label = {
        name: {
            "f1": _ratio(2 * diag[c], rows[c] + columns[c]),
            "iou": _ratio(diag[c], rows[c] + columns[c] - diag[c]),
            "support": int(rows[c]),
            "predicted": int(columns[c]),
        }
        for c, name in enumerate(class_names)
    }
    foreground = [m["f1"] for n, m in per_label.items() if n != BACKGROUND and m["f1"] is not None]
    ious = [m["iou"] for m in per_label.values() if m["iou"] is not None]
    total = int(confusion.sum())
    summary = {
        "mean_f1": float(np.mean(foreground)) if foreground else float("nan"),
        "miou": float(np.mean(ious)) if ious else float("nan"),
        "pixel_accuracy": float(diag.sum() / total) if total else float("nan"),
    }
    return {"summary": summary, "per_label": per_label, "n_pixels": total}


def nme_per_face(predicted: np.ndarray, true: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """[N] mean point error over the normaliser of each face; points [N, K, 2], norms [N]."""
    predicted, true, norms = (np.asarray(a, dtype=np.float64) for a in (predicted, true, norms))
    if predicted.shape != true.shape or true.ndim != 3 or norms.shape != (len(true),):
        raise ValueError(f"points {predicted.shape} and {true.shape} with norms {norms.shape}")
    return np.linalg.norm(predicted - true, axis=-1).mean(axis=1) / norms


def landmark_scores(
    predicted: np.ndarray,
    true: np.ndarray,
    norms: np.ndarray,
    thresholds: Sequence[float] = (0.1,),
    point_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """`summary` (nme, and per threshold t fr_<t> and auc_<t>) and `per_label` (per point: its
    mean error over the normaliser, `nme`) of predicted and true points in one pixel frame."""
    per_face = nme_per_face(predicted, true, norms)
    summary: dict[str, float] = {"nme": float(per_face.mean())}
    for t in thresholds:
        if not t > 0:
            raise ValueError(f"an NME threshold must be positive, not {t}")
        summary[f"fr_{t:g}"] = float((per_face > t).mean())
        summary[f"auc_{t:g}"] = float(np.maximum(0.0, 1.0 - per_face / t).mean())
    per_point = np.linalg.norm(np.asarray(predicted) - np.asarray(true), axis=-1) / np.asarray(norms)[:, None]
    names = point_names or [f"p{i}" for i in range(per_point.shape[1])]
    per_label = {name: {"nme": float(per_point[:, k].mean())} for k, name in enumerate(names)}
    return {"summary": summary, "per_label": per_label, "per_face_nme": per_face.tolist()}
