"""Linear probes: L2-regularised logistic regression on frozen features, in torch.

Multi-class labels take a softmax regression, multi-label attributes one-vs-rest logistic
regressions. The one-vs-rest problems are independent (no shared term in the loss), so all
of them are solved together as one [D, A] weight matrix: every L-BFGS step is a single
matrix product over the features instead of one pass per attribute, which is what makes a
40-attribute CelebA probe fast (bench/probe_speed.py compares it with scikit-learn).

The objective per problem is scikit-learn's with C = 1 / (l2 * n): mean log-loss over the
labelled samples + l2/2 * ||w||^2 (bias unregularised), on standardised features.
The protocol chooses l2 on a validation split (or a held-out part of train), refits, and
repeats for few-shot fractions of the training labels drawn with a fixed seed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flip.evaluation.features import BenchmarkFeatures, SplitFeatures, model_device
from flip.evaluation.lbfgs import columnwise_lbfgs
from flip.evaluation.metrics import attribute_scores, classification_scores
from flip.evaluation.ridge import DEFAULT_ALPHA_GRID
from flip.models import FlipModel

DEFAULT_L2_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)
SELECTIONS = ("honest", "test_as_published")
AS_PUBLISHED = "selected on test, as published"  # the label metrics.json and the report carry
# below this many multiply-adds per objective evaluation, one CPU thread is faster: the
# problem is too small to split, and on a busy machine waiting for a second thread costs more
# than the work itself (measured: bench/README.md, "Linear probe")
SINGLE_THREAD_BELOW = 20_000_000


@contextlib.contextmanager
def _cpu_threads_for(work: int, device: torch.device) -> Iterator[None]:
    """One intra-op thread for small CPU problems, the configured number otherwise."""
    threads = torch.get_num_threads()
    small = device.type == "cpu" and work < SINGLE_THREAD_BELOW and threads > 1
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(threads)


@dataclass
class LogisticRegression:
    """A fitted probe: standardisation, then logits = x @ weight + bias."""

    weight: torch.Tensor  # [D, K]
    bias: torch.Tensor  # [K]
    mean: torch.Tensor  # [D]
    scale: torch.Tensor  # [D]
    multilabel: bool
    l2: float
    iterations: int = 0

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.device, torch.float32)
        return ((x - self.mean) / self.scale) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Bool [N, K] decisions for attributes, class indices [N] otherwise."""
        logits = self.decision_function(x)
        return logits > 0 if self.multilabel else logits.argmax(dim=1)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decision_function(x)
        return torch.sigmoid(logits) if self.multilabel else logits.softmax(dim=1)


def standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (unbiased) standard deviation of the features (1 where constant).

    Two passes in row blocks: torch's column-wise `std` over a tall matrix is far slower than
    its column-wise `sum` (timings: bench/README.md, "Linear probe").
    """
    x = x.to(torch.float32)
    mean = x.mean(dim=0)
    squares = torch.zeros_like(mean)
    for block in x.split(16384):
        squares += (block - mean).square_().sum(dim=0)
    scale = (squares / max(1, len(x) - 1)).sqrt_()
    return mean, torch.where(scale > 1e-6, scale, torch.ones_like(scale))


class RegularizedLogLoss:
    """The probe's objective and its gradient, computed by hand (two matrix products per step).

    Multi-label: per attribute, the mean binary log-loss over the samples labelled for it;
    multi-class: the mean softmax cross-entropy; plus l2/2 ||W||^2 (no bias penalty).
    The weights act on standardised features (x - mean) / scale, which are never materialised:
    the standardisation is folded into each product (a CelebA-sized copy costs a second).
    Autograd would keep and re-read several [N, K] intermediates per step.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        l2: float,
        multilabel: bool,
        num_classes: int,
        standardize: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.x, self.l2, self.multilabel = x, l2, multilabel
        if standardize is None:
            standardize = (x.new_zeros(x.shape[1]), x.new_ones(x.shape[1]))
        self.mean, self.scale = standardize
        if multilabel:
            labelled = y >= 0
            self.target = y.clamp(min=0).to(x.dtype)
            self.sign = self.target * 2 - 1  # +1 present, -1 absent
            # per-entry weight 1/count (0 where unlabelled): each column is its own mean
            self.weight = labelled.to(x.dtype) / labelled.sum(dim=0).clamp(min=1).to(x.dtype)
        else:
            self.target = y
            self.onehot = F.one_hot(y, num_classes).to(x.dtype)

    @torch.no_grad()
    def columns(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-label: the value of each attribute's problem [K], and what `gradient` reuses.

        The log-loss of a sample is -log(sigmoid(s * logit)) with s = +1 if present, -1 if
        not: one sigmoid serves the value and the gradient (torch's fused log-loss spends
        longer in its transcendental functions at this size: bench/README.md, "Linear probe").
        """
        margin = self._logits(weight, bias).mul_(self.sign)
        p = torch.sigmoid(margin.clamp(min=-80.0))  # sigmoid(-80) is still a normal float32
        losses = torch.log(p).neg_().add_((-80.0 - margin).clamp_(min=0.0)).mul_(self.weight)
        return losses.sum(dim=0) + 0.5 * self.l2 * weight.square().sum(dim=0), p

    @torch.no_grad()
    def gradient(
        self, weight: torch.Tensor, bias: torch.Tensor, cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients at the point `columns` (multi-label: `cache` = its sigmoids) or `_logits` ran."""
        if self.multilabel:  # d loss / d logit = sigmoid(logit) - target = s * (p - 1)
            residual = (cache - 1.0).mul_(self.sign).mul_(self.weight)
        else:
            logits = cache
            residual = torch.softmax(logits, dim=1).sub_(self.onehot).div_(logits.shape[0])
        total = residual.sum(dim=0)
        centred = torch.addmm(self.mean[:, None] * total, self.x.T, residual, alpha=1.0, beta=-1.0)
        return centred.div_(self.scale[:, None]).add_(weight, alpha=self.l2), total

    def _logits(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """((x - mean) / scale) @ weight + bias, as x @ (weight / scale) + shifted bias."""
        scaled = weight / self.scale[:, None]
        return torch.addmm(bias - self.mean @ scaled, self.x, scaled)

    @torch.no_grad()
    def __call__(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The total value; writes the gradient into weight.grad and bias.grad (for torch's L-BFGS)."""
        if self.multilabel:
            values, cache = self.columns(weight, bias)
            value = values.sum()
        else:
            cache = self._logits(weight, bias)
            value = F.cross_entropy(cache, self.target) + 0.5 * self.l2 * weight.square().sum()
        weight.grad, bias.grad = self.gradient(weight, bias, cache)
        return value


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    l2: float,
    multilabel: bool,
    num_classes: int | None = None,
    standardize: tuple[torch.Tensor, torch.Tensor] | None = None,
    init: LogisticRegression | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> LogisticRegression:
    """Minimise the regularised log-loss with full-batch L-BFGS.

    Attributes: every column its own L-BFGS (flip.evaluation.lbfgs); classes: torch's L-BFGS
    with a strong Wolfe line search on the one softmax problem.

    x: [N, D] features; y: [N, K] in {1, 0, -1 = unlabelled} (multilabel) or [N] class indices.
    `standardize` gives the (mean, scale) to use (default: from x); `init` warm-starts, which
    makes a sweep over l2 values from strong to weak cost little more than one fit.
    Stops when the largest gradient entry is below `tol` or after `max_iter` iterations.
    """
    if l2 < 0:
        raise ValueError(f"l2={l2} must be >= 0")
    x = x.to(torch.float32)
    mean, scale = standardize if standardize is not None else standardizer(x)
    mean, scale = mean.to(x.device), scale.to(x.device)
    if multilabel:
        y = y.to(x.device, torch.int8)
        k = y.shape[1]
    else:
        y = y.to(x.device, torch.int64)
        k = num_classes if num_classes is not None else int(y.max()) + 1
    d = x.shape[1]
    if init is not None:
        weight = init.weight.detach().clone().to(x.device)
        bias = init.bias.detach().clone().to(x.device)
    else:
        weight = torch.zeros(d, k, device=x.device)
        bias = torch.zeros(k, device=x.device)
    objective = RegularizedLogLoss(x, y, l2, multilabel, k, (mean, scale))
    with _cpu_threads_for(x.shape[0] * d * k, x.device):
        if multilabel:  # independent problems: each column its own L-BFGS, one product for all
            weight, bias, iterations = columnwise_lbfgs(objective, weight, bias, max_iter, tol)
        else:
            optimizer = torch.optim.LBFGS(
                [weight, bias],
                lr=1.0,
                max_iter=max_iter,
                history_size=10,
                tolerance_grad=tol,
                tolerance_change=1e-10,
                line_search_fn="strong_wolfe",
            )
            optimizer.step(lambda: objective(weight, bias))
            iterations = optimizer.state[weight].get("n_iter", 0)
    return LogisticRegression(weight, bias, mean, scale, multilabel, float(l2), int(iterations))


# -- the protocol ------------------------------------------------------------------------------


def score_probe(
    probe: LogisticRegression, x: torch.Tensor, y: np.ndarray, names: Sequence[str]
) -> dict[str, Any]:
    """summary + per_label (+ confusion matrix for classes) of the probe's decisions on (x, y)."""
    pred = probe.predict(x).cpu().numpy()
    if probe.multilabel:
        summary, per_label = attribute_scores(y, pred, names)
        return {"summary": summary, "per_label": per_label}
    summary, per_label, confusion = classification_scores(y, pred, names)
    return {"summary": summary, "per_label": per_label, "confusion_matrix": confusion}


def _selection_score(result: dict[str, Any], multilabel: bool) -> float:
    """Validation score that picks l2: mean accuracy over attributes, or accuracy over classes."""
    value = result["summary"]["mean_accuracy" if multilabel else "accuracy"]
    return -math.inf if math.isnan(value) else value


def sweep_l2(
    x_fit: torch.Tensor,
    y_fit: np.ndarray,
    x_val: torch.Tensor,
    y_val: np.ndarray,
    names: Sequence[str],
    multilabel: bool,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    max_iter: int = 300,
) -> tuple[float, dict[float, float], LogisticRegression]:
    """Fit every l2 of the grid (strong to weak, warm-started) and keep the best on validation.

    Ties go to the stronger regularisation. Returns (best l2, {l2: score}, probe at best l2).
    """
    num_classes = None if multilabel else len(names)
    norm = standardizer(x_fit.float())
    y_fit_t = torch.as_tensor(y_fit)
    scores: dict[float, float] = {}
    best: tuple[float, LogisticRegression] | None = None
    previous = None
    for l2 in sorted(grid, reverse=True):
        probe = fit_logistic_regression(
            x_fit, y_fit_t, l2, multilabel, num_classes, norm, init=previous, max_iter=max_iter
        )
        scores[float(l2)] = _selection_score(score_probe(probe, x_val, y_val, names), multilabel)
        if best is None or scores[float(l2)] > best[0]:
            best = (scores[float(l2)], probe)
        previous = probe
    assert best is not None, "the l2 grid is empty"
    return best[1].l2, scores, best[1]


def fraction_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded subset of round(fraction * n) (at least 2) training indices, sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} must be in (0, 1]")
    count = min(n, max(2, round(fraction * n)))
    if count == n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))


def _fit_selected(
    x: torch.Tensor,
    y: np.ndarray,
    val: tuple[torch.Tensor, np.ndarray] | None,
    names: Sequence[str],
    multilabel: bool,
    grid: Sequence[float],
    seed: int,
    holdout: float,
    max_iter: int,
) -> tuple[LogisticRegression, dict[float, float], str]:
    """The probe for one training set, its l2 chosen on `val` or on a held-out part of (x, y)."""
    if val is not None:
        _, scores, probe = sweep_l2(x, y, val[0].to(x.device), val[1], names, multilabel, grid, max_iter)
        return probe, scores, "val"
    order = np.random.default_rng(seed + 1).permutation(len(y))
    held = max(1, round(holdout * len(y)))
    fit, check = np.sort(order[held:]), np.sort(order[:held])
    l2, scores, probe = sweep_l2(x[fit], y[fit], x[check], y[check], names, multilabel, grid, max_iter)
    num_classes = None if multilabel else len(names)
    refit = fit_logistic_regression(
        x, torch.as_tensor(y), l2, multilabel, num_classes, init=probe, max_iter=max_iter
    )
    return refit, scores, f"held-out {holdout:.0%} of train"


def linear_probe(
    train: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    names: Sequence[str],
    task: str,
    val: tuple[torch.Tensor, np.ndarray] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    seed: int = 0,
    holdout: float = 0.2,
    max_iter: int = 300,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, Any]]:
    """The probe for every training fraction: {"0.01": {n_train, l2, l2_scores, summary, per_label}, ...}.

    l2 is chosen on `val` when given, else on a seeded `holdout` part of the fraction's training
    samples, after which the probe is refit on all of them with the chosen l2.
    """
    if task not in ("attributes", "classification"):
        raise ValueError(f"task {task!r}: a linear probe needs 'attributes' or 'classification' labels")
    multilabel = task == "attributes"
    x_train, y_train = train[0].to(device), train[1]
    x_test, y_test = test[0].to(device), test[1]
    work = x_train.shape[0] * x_train.shape[1] * (y_train.shape[1] if multilabel else len(names))
    results = {}
    with _cpu_threads_for(work, x_train.device):
        for fraction in fractions:
            chosen = fraction_indices(len(y_train), fraction, seed)
            probe, scores, selected_on = _fit_selected(
                x_train[chosen], y_train[chosen], val, names, multilabel, grid, seed, holdout, max_iter
            )
            results[repr(float(fraction))] = {
                "fraction": float(fraction),
                "n_train": len(chosen),
                "l2": probe.l2,
                "l2_selected_on": selected_on,
                "l2_scores": {f"{k:g}": v for k, v in scores.items()},
                **score_probe(probe, x_test, y_test, names),
            }
    return results


def select_on_test(
    train: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    names: Sequence[str],
    task: str,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    max_iter: int = 300,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The probe whose l2 scores best on the TEST split, fitted on all of `train`: what FLIP's
    and FaRL's released code did (they kept the epoch with the best test accuracy). Optimistic
    by construction, so it is reported only beside the honest figure, under its label."""
    multilabel = task == "attributes"
    x_train, x_test = train[0].to(device), test[0].to(device)
    l2, _, probe = sweep_l2(x_train, train[1], x_test, test[1], names, multilabel, grid, max_iter)
    return {
        "label": AS_PUBLISHED,
        "summary": score_probe(probe, x_test, test[1], names)["summary"],
        "selected": {"l2": l2},
    }


@dataclass
class LinearProbe:
    """The linear-probe protocol (conf/protocol/linear_probe.yaml): probes trained on
    `train_split` (a seeded subsample of `max_train`), l2 chosen on `val_split` (`max_val`; or
    on a held-out part of train when it is None), tested on the evaluated split.

    The subsamples are drawn with the probe's `seed`, as are the few-shot fractions.
    `selection="test_as_published"` also reports, as `as_published`, the probe of the largest
    fraction with its l2 chosen on the test split, as the papers' code chose; `summary` stays honest.
    On a multitask split (UTKFace, FairFace) each question gets a softmax probe and each value
    a ridge regression (flip.evaluation.multitask_probe); an attribute split's multi-class
    questions (FaceShapes' expression) get a softmax probe each, beside the binary probes.
    """

    train_split: str
    val_split: str | None = None
    max_train: int | None = None
    max_val: int | None = None
    fractions: Sequence[float] = DEFAULT_FRACTIONS
    l2_grid: Sequence[float] = DEFAULT_L2_GRID
    seed: int = 0
    holdout: float = 0.2
    max_iter: int = 300
    # ridge strengths for regression values (UTKFace's age), chosen by MAE like l2
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID
    selection: str = "honest"

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"linear_probe selection {self.selection!r} is not one of {', '.join(SELECTIONS)}"
            )

    def __call__(
        self, model: FlipModel, features: BenchmarkFeatures, checkpoint: str | None = None
    ) -> dict[str, Any]:
        if not self.train_split:  # else features(None) is the evaluated split: a probe trained on test
            raise ValueError(
                f"{features.benchmark.name} has no train split, so there is nothing to fit a linear "
                "probe on (a retrieval-only benchmark such as celeba_caption): use eval/retrieval.py"
            )
        train = features(self.train_split, self.max_train, self.seed)
        val = features(self.val_split, self.max_val, self.seed) if self.val_split else None
        if train.split.task == "multitask":  # questions and values: flip.evaluation.multitask_probe
            from flip.evaluation.multitask_probe import multitask_probe_metrics  # it builds on this module

            subgroups = features.benchmark.subgroups
            return multitask_probe_metrics(
                self, train, features(), val, checkpoint, model_device(model), subgroups
            )
        test = features()
        metrics = self.metrics(train, test, val, checkpoint, model_device(model))
        if test.split.questions:  # multi-class questions beside the binary attributes (FaceShapes)
            from flip.evaluation.multitask_probe import add_question_probes

            add_question_probes(self, train, test, val, metrics, model_device(model))
        return metrics

    def metrics(
        self,
        train: SplitFeatures,
        test: SplitFeatures,
        val: SplitFeatures | None,
        checkpoint: str | None,
        device: torch.device | str = "cpu",
    ) -> dict[str, Any]:
        """metrics.json of the probe: every fraction, and the largest fraction at the top level."""
        if train.split.task != test.split.task or train.split.label_names != test.split.label_names:
            raise ValueError(
                f"train and test splits disagree on their labels: {train.split.label_names} vs "
                f"{test.split.label_names}"
            )
        fractions = linear_probe(
            (train.features, train.split.targets),
            (test.features, test.split.targets),
            test.split.label_names,
            test.split.task,
            val=None if val is None else (val.features, val.split.targets),
            fractions=sorted(float(f) for f in self.fractions),
            grid=[float(v) for v in self.l2_grid],
            seed=self.seed,
            holdout=self.holdout,
            max_iter=self.max_iter,
            device=device,
        )
        top = fractions[max(fractions, key=float)]
        metrics = {
            "benchmark": test.split.benchmark,
            "protocol": "linear_probe",
            "task": test.split.task,
            "checkpoint": checkpoint,
            "split": test.split.split,
            "n_train": top["n_train"],
            "n_test": len(test.split),
            "labels": list(test.split.label_names),
            "summary": top["summary"],
            "per_label": top["per_label"],
            "l2": top["l2"],
            "train_split": train.split.split,
            "val_split": None if val is None else val.split.split,
            "fractions": fractions,
        }
        if "confusion_matrix" in top:
            metrics["confusion_matrix"] = top["confusion_matrix"]
        if self.selection == "test_as_published":  # beside the honest summary, never instead of it
            chosen = fraction_indices(len(train.split), max(float(f) for f in self.fractions), self.seed)
            metrics["as_published"] = select_on_test(
                (train.features[chosen], train.split.targets[chosen]),
                (test.features, test.split.targets),
                test.split.label_names,
                test.split.task,
                [float(v) for v in self.l2_grid],
                self.max_iter,
                device,
            )
        return metrics
