"""The linear probe on multitask splits (UTKFace, FairFace): a softmax probe per question and
a ridge regression per value, on the same cached pooled features.

Each question (gender, race, age group) is the logistic probe of flip.evaluation.linear_probe
on the samples labelled for it, its l2 chosen on the validation split or a seeded held-out
part of train, exactly as a classification benchmark's; each value (age) is a ridge
regression (flip.evaluation.ridge), its alpha chosen the same way by mean absolute error.
Repeated for each fraction of the training samples, as the probe always is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flip.evaluation.features import SplitFeatures
from flip.evaluation.linear_probe import AS_PUBLISHED, LinearProbe, _fit_selected, fraction_indices
from flip.evaluation.multitask import MultitaskPredictions, QuestionPredictions, ValuePredictions
from flip.evaluation.ridge import fit_ridge, select_ridge
from flip.evaluation.subgroups import subgroup_labels, subgroup_metrics


def _check_labels(train: SplitFeatures, test: SplitFeatures) -> None:
    for name, (classes, _) in test.split.questions.items():
        if name not in train.split.questions or train.split.questions[name][0] != classes:
            raise ValueError(
                f"train and test splits disagree on question {name!r}: "
                f"{train.split.questions.get(name, (None,))[0]} vs {classes}"
            )
    missing = set(test.split.values) - set(train.split.values)
    if missing:
        raise ValueError(f"the train split has no labels for the value(s) {sorted(missing)}")


MIN_LABELLED = 2  # training samples a probe needs


def _labelled(features: torch.Tensor, labels: np.ndarray, keep: np.ndarray, what: str) -> tuple:
    if keep.sum() < MIN_LABELLED:
        raise ValueError(
            f"{what}: {int(keep.sum())} labelled training sample(s); a probe needs at least {MIN_LABELLED}"
        )
    return features[torch.as_tensor(keep)], labels[keep]


def _ridge_selected(
    x: torch.Tensor,
    y: np.ndarray,
    val: tuple[torch.Tensor, np.ndarray] | None,
    grid: Sequence[float],
    seed: int,
    holdout: float,
) -> tuple[Any, dict[float, float], str]:
    """The ridge for one training set, its alpha chosen on `val` or on a held-out part of (x, y)
    (the same seeded hold-out as the logistic probe's), then refit on all of (x, y)."""
    if val is not None:
        fit, errors = select_ridge(x, y, val[0], val[1], grid)
        return fit, errors, "val"
    order = np.random.default_rng(seed + 1).permutation(len(y))
    held = max(1, round(holdout * len(y)))
    fit_part, check = np.sort(order[held:]), np.sort(order[:held])
    chosen, errors = select_ridge(x[fit_part], y[fit_part], x[check], y[check], grid)
    return fit_ridge(x, y, chosen.alpha), errors, f"held-out {holdout:.0%} of train"


def _one_fraction(
    probe: LinearProbe,
    train: SplitFeatures,
    test: SplitFeatures,
    val: SplitFeatures | None,
    chosen: np.ndarray,
    device: torch.device | str,
) -> tuple[MultitaskPredictions, dict[str, dict[str, Any]]]:
    """Predictions on the test split of probes fit on the `chosen` training samples, and how
    each probe's regularisation was chosen."""
    x_train, x_test = train.features[torch.as_tensor(chosen)].to(device), test.features.to(device)
    grid, alphas = [float(v) for v in probe.l2_grid], [float(v) for v in probe.alpha_grid]
    predictions, selection = MultitaskPredictions(), {}
    for name, (classes, y_test) in test.split.questions.items():
        y = train.split.questions[name][1][chosen]
        x, y = _labelled(x_train, y, y >= 0, f"question {name!r}")
        held = None
        if val is not None:
            y_val = val.split.questions[name][1]
            held = (val.features[torch.as_tensor(y_val >= 0)].to(device), y_val[y_val >= 0])
        fit, scores, on = _fit_selected(
            x, y, held, classes, False, grid, probe.seed, probe.holdout, probe.max_iter
        )
        predictions.questions[name] = QuestionPredictions(classes, y_test, fit.predict(x_test).cpu().numpy())
        selection[name] = {
            "l2": fit.l2,
            "l2_selected_on": on,
            "l2_scores": {f"{k:g}": v for k, v in scores.items()},
        }
    for name, y_test in test.split.values.items():
        y = train.split.values[name][chosen]
        x, y = _labelled(x_train, y, np.isfinite(y), f"value {name!r}")
        held = None
        if val is not None and name in val.split.values:
            y_val = val.split.values[name]
            held = (val.features[torch.as_tensor(np.isfinite(y_val))].to(device), y_val[np.isfinite(y_val)])
        fit, errors, on = _ridge_selected(x, y, held, alphas, probe.seed, probe.holdout)
        predictions.values[name] = ValuePredictions(y_test, fit.predict(x_test).cpu().numpy())
        selection[name] = {
            "alpha": fit.alpha,
            "alpha_selected_on": on,
            "alpha_mae": {f"{k:g}": v for k, v in errors.items()},
        }
    return predictions, selection


def add_question_probes(
    probe: LinearProbe,
    train: SplitFeatures,
    test: SplitFeatures,
    val: SplitFeatures | None,
    metrics: dict[str, Any],
    device: torch.device | str = "cpu",
) -> None:
    """Adds an attribute split's multi-class questions (FaceShapes' hair colour and expression)
    to its probe's `metrics`, scored as zero-shot scores them: `<q>_accuracy` and
    `<q>_mean_per_class_recall` in each fraction's summary and the top level's, the largest
    fraction's details under `multiclass`. Without them a run could not tell whether its image
    features carry an expression that zero-shot misses, or the text side is what is missing."""
    _check_labels(train, test)
    predictions, selection, scores = None, {}, {}
    for block in sorted(metrics["fractions"].values(), key=lambda b: b["fraction"]):
        chosen = fraction_indices(len(train.split), block["fraction"], probe.seed)
        labelled = [(y[chosen] >= 0).sum() for _, y in train.split.questions.values()]
        if min(labelled) < MIN_LABELLED:  # a few-shot fraction too small for a question: binary only
            continue
        predictions, selection = _one_fraction(probe, train, test, val, chosen, device)
        scores = predictions.scores()
        block["summary"].update(scores)
    if predictions is None:
        return
    multiclass = predictions.multiclass()
    for name, block in multiclass.items():
        block.update(selection[name])
    metrics["summary"].update(scores)
    metrics["multiclass"] = multiclass


def multitask_probe_metrics(
    probe: LinearProbe,
    train: SplitFeatures,
    test: SplitFeatures,
    val: SplitFeatures | None,
    checkpoint: str | None,
    device: torch.device | str = "cpu",
    subgroups: Sequence[str] = (),
) -> dict[str, Any]:
    """metrics.json of the probe on a multitask split: every fraction's summary and choices
    under `fractions`, the largest fraction's details (`multiclass`, `regression`) and, where
    the benchmark names them, its metrics per subgroup (`subgroups`) at the top level."""
    _check_labels(train, test)
    groups = subgroup_labels(test.split, subgroups)
    fractions, top = {}, None
    for fraction in sorted(float(f) for f in probe.fractions):
        chosen = fraction_indices(len(train.split), fraction, probe.seed)
        predictions, selection = _one_fraction(probe, train, test, val, chosen, device)
        largest = chosen
        fractions[repr(fraction)] = {
            "fraction": fraction,
            "n_train": len(chosen),
            "selection": selection,
            "summary": predictions.scores(),
        }
        top = (predictions, selection)
    predictions, selection = top
    multiclass, regression = predictions.multiclass(), predictions.regression()
    for name, block in [*multiclass.items(), *regression.items()]:
        block.update(selection[name])
    metrics = {
        "benchmark": test.split.benchmark,
        "protocol": "linear_probe",
        "task": "multitask",
        "checkpoint": checkpoint,
        "split": test.split.split,
        "n_train": fractions[max(fractions, key=float)]["n_train"],
        "n_test": len(test.split),
        "labels": [],
        "summary": predictions.scores(),
        "per_label": {},
        "multiclass": multiclass,
        "train_split": train.split.split,
        "val_split": None if val is None else val.split.split,
        "fractions": fractions,
    }
    if regression:
        metrics["regression"] = regression
    if groups:
        metrics["subgroups"] = subgroup_metrics(predictions, groups)
    if probe.selection == "test_as_published":  # the test split as the "validation": beside, never instead
        on_test, chosen_on_test = _one_fraction(probe, train, test, test, largest, device)
        metrics["as_published"] = {
            "label": AS_PUBLISHED,
            "summary": on_test.scores(),
            "selected": {
                name: {k: v for k, v in block.items() if k in ("l2", "alpha")}
                for name, block in chosen_on_test.items()
            },
        }
    return metrics
