"""Face verification (LFW, CALFW, CPLFW), no training: are two faces one person?

A pair's score is the cosine similarity of its two images' L2-normalised embeddings (with
`flip_test`, each embedding is first summed with its mirror image's, as insightface's
verification eval does). The published 10-fold protocol: for each fold, the threshold that
maximises accuracy on the other nine folds is applied to it; the figure is the mean and std
(population, as insightface's `np.std`) of the ten held-out accuracies. The threshold search
is exact: every cut between two distinct sorted training scores is a candidate, placed at
their midpoint (pairs scoring above it are called "same"), and the lowest of equally accurate
candidates wins. ROC AUC and TAR at a FAR are threshold-free figures over all pairs; a TAR at
a FAR below one false accept in the pairs held (fewer than 1/FAR different-person pairs) is
not reported, since it could only be the TAR at FAR 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flip.benchmarks.base import Pairs
from flip.evaluation.features import BenchmarkFeatures, SplitFeatures
from flip.models import FlipModel

FARS = (1e-2, 1e-3, 1e-4)


def pair_scores(features: torch.Tensor, pairs: Pairs) -> np.ndarray:
    """Cosine similarity of each pair's two (already L2-normalised) image features."""
    index = torch.as_tensor(pairs.index)
    return (features[index[:, 0]] * features[index[:, 1]]).sum(-1).double().numpy()


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy): the cut of `scores` that classifies `same` best as `score > threshold`.

    Candidates are the midpoints between consecutive distinct scores, and one below the lowest
    and one above the highest (everything "same" / everything "different"); the lowest of
    equally accurate candidates is taken.
    """
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], same[order].astype(bool)
    n = len(s)
    # cut k: the k lowest scores called "different"; correct = different among them + same above
    different_below = np.concatenate([[0], np.cumsum(~y)])
    same_above = y.sum() - np.concatenate([[0], np.cumsum(y)])
    correct = different_below + same_above
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] > s[:-1]  # a cut between equal scores is not a threshold
    k = int(np.flatnonzero(valid)[np.argmax(correct[valid])])
    if k == 0:
        threshold = float(s[0]) - 1.0
    elif k == n:
        threshold = float(s[-1]) + 1.0
    else:
        threshold = float((s[k - 1] + s[k]) / 2)
    return threshold, float(correct[k] / n)


def kfold_accuracies(scores: np.ndarray, same: np.ndarray, fold: np.ndarray) -> list[dict[str, Any]]:
    """Per fold (in order): the threshold chosen on the other folds, and its accuracy on this one."""
    out = []
    for k in np.unique(fold):
        test, train = fold == k, fold != k
        threshold, train_accuracy = best_threshold(scores[train], same[train])
        predicted = scores[test] > threshold
        out.append(
            {
                "fold": int(k) + 1,
                "threshold": threshold,
                "accuracy": float((predicted == same[test]).mean()),
                "train_accuracy": train_accuracy,
                "n_pairs": int(test.sum()),
                "n_same": int(same[test].sum()),
            }
        )
    return out


def roc_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, thresholds) as the threshold falls through the distinct scores; the points
    on straight stretches are dropped (the curve is the same), as scikit-learn's roc_curve does."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order].astype(bool)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last pair of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    keep = np.ones(len(last), dtype=bool)
    if len(last) > 2:
        keep[1:-1] = np.logical_or(np.diff(fp, 2), np.diff(tp, 2))
    tp, fp, thresholds = np.r_[0, tp[keep]], np.r_[0, fp[keep]], np.r_[np.inf, s[last][keep]]
    return fp / max(fp[-1], 1), tp / max(tp[-1], 1), thresholds


def roc_auc(far: np.ndarray, tar: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids; ties count half, as the pairwise definition has it)."""
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2))


def tar_at_far(far: np.ndarray, tar: np.ndarray, target: float) -> float:
    """The highest TAR whose FAR does not exceed `target`."""
    return float(tar[far <= target].max())


def verification_metrics(
    scores: np.ndarray, same: np.ndarray, fold: np.ndarray, fars: Sequence[float] = FARS
) -> dict[str, Any]:
    """Summary (mean / std fold accuracy, AUC, TAR@FAR), per-fold results, ROC points and notes."""
    same = same.astype(bool)
    if same.all() or not same.any():
        raise ValueError(
            f"verification needs same- and different-person pairs; these {len(same)} pairs are all "
            f"{'same' if same.all() else 'different'}"
        )
    if len(np.unique(fold)) < 2:
        raise ValueError(
            f"the 10-fold protocol needs pairs in at least two folds; these {len(same)} pairs are all in "
            f"fold {int(fold[0]) + 1} (a small max_samples leaves few pairs whole)"
        )
    folds = kfold_accuracies(scores, same, fold)
    accuracies = np.array([f["accuracy"] for f in folds])
    far, tar, _ = roc_curve(scores, same)
    n_different = int((~same).sum())
    summary = {
        "accuracy_mean": float(accuracies.mean()),
        "accuracy_std": float(accuracies.std()),
        "roc_auc": roc_auc(far, tar),
    }
    tars, notes = {}, []
    for target in fars:
        name = f"TAR@FAR={target:.0e}".replace("e-0", "e-")
        if n_different * target < 1:
            tars[name] = None
            notes.append(
                f"{name} not reported: it needs at least {round(1 / target):,} different-person pairs, "
                f"there are {n_different:,}"
            )
        else:
            tars[name] = summary[name] = tar_at_far(far, tar, target)
    return {
        "summary": summary,
        "folds": folds,
        "tar_at_far": tars,
        "roc": {"far": far.tolist(), "tar": tar.tolist()},
        "notes": notes,
    }


def evaluate_verification(
    features: SplitFeatures,
    checkpoint: str | None = None,
    flip_test: bool = True,
    fars: Sequence[float] = FARS,
) -> dict[str, Any]:
    """Verification metrics of a pairs split, in the metrics.json schema."""
    split = features.split
    if split.pairs is None:
        raise ValueError(
            f"{split.benchmark}/{split.split} has no pairs: verification needs a verification "
            "benchmark (benchmark=lfw, calfw or cplfw)"
        )
    pairs = split.pairs
    scores = pair_scores(features.features, pairs)
    listed = split.info.get("pairs_listed", len(pairs))
    by_reader = dict(split.skipped_by_reason)
    lost = listed - len(pairs) - sum(by_reader.values())  # images unreadable at extraction or subsampled
    pairs_skipped = {**by_reader, **({"image_unreadable_or_not_sampled": lost} if lost else {})}
    return {
        "benchmark": split.benchmark,
        "protocol": "verification",
        "task": "verification",
        "checkpoint": checkpoint,
        "split": split.split,
        "n_train": 0,
        "n_test": len(pairs),
        "labels": [],
        **verification_metrics(scores, pairs.same, pairs.fold, fars),
        "per_label": {},
        "n_pairs": len(pairs),
        "n_same": int(pairs.same.sum()),
        "n_images": len(split),
        "pairs_listed": listed,
        "pairs_skipped": pairs_skipped,
        "flip_test": flip_test,
        "threshold_rule": "the most accurate cut of the other folds' scores, at the midpoint "
        "between two distinct scores (the lowest of equals); a score above it is 'same'",
    }


@dataclass
class Verification:
    """The verification protocol (conf/protocol/verification.yaml): the 10-fold protocol on the
    evaluated split's pairs; `flip_test` sums each image's and its mirror's embedding."""

    flip_test: bool = True
    fars: list[float] = field(default_factory=lambda: list(FARS))

    def __call__(
        self, model: FlipModel, features: BenchmarkFeatures, checkpoint: str | None = None
    ) -> dict[str, Any]:
        return evaluate_verification(features(flip=self.flip_test), checkpoint, self.flip_test, self.fars)
