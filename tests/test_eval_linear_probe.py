"""The torch logistic-regression probe against scikit-learn, and the probe protocol on planted signals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression as SkLogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, recall_score

from flip.benchmarks.base import ImageFiles, LabelledSplit
from flip.evaluation.features import SplitFeatures
from flip.evaluation.linear_probe import (
    LinearProbe,
    fit_logistic_regression,
    fraction_indices,
    linear_probe,
    standardizer,
)
from flip.evaluation.multitask_probe import add_question_probes


def _planted_attributes(n: int, d: int, a: int, seed: int, noise: float = 0.3, draws: int = 1):
    """`draws` sets of features whose attributes are thresholded linear functions of them (one
    hidden w and bias for all sets), plus logistic label noise; and w."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, a)) / np.sqrt(d)
    bias = rng.normal(size=a) * 0.5
    sets = []
    for _ in range(draws):
        x = rng.normal(size=(n, d)).astype(np.float32)
        y = ((x @ w + bias + noise * rng.logistic(size=(n, a))) > 0).astype(np.int8)
        sets.append((torch.from_numpy(x), y))
    return (*sets, w)


@pytest.mark.parametrize("multilabel", [True, False])
def test_fit_equals_sklearn_logistic_regression(multilabel):
    rng = np.random.default_rng(0)
    n, d, l2 = 400, 12, 1e-2
    x = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    if multilabel:
        y = (rng.random((n, 3)) < 0.4).astype(np.int8)
    else:
        y = (x.numpy() @ rng.normal(size=(d, 4))).argmax(1)
    probe = fit_logistic_regression(x, torch.as_tensor(y), l2, multilabel, max_iter=500, tol=1e-7)
    mean, scale = standardizer(x)
    xs = ((x - mean) / scale).numpy().astype(np.float64)
    # scikit-learn's objective is C * sum(loss) + ||w||^2 / 2: the same optimum at C = 1 / (l2 * n)
    if multilabel:
        for a in range(3):
            sk = SkLogisticRegression(C=1 / (l2 * n), tol=1e-10, max_iter=5000).fit(xs, y[:, a])
            np.testing.assert_allclose(probe.weight[:, a].numpy(), sk.coef_[0], atol=2e-3)
            np.testing.assert_allclose(probe.bias[a].item(), sk.intercept_[0], atol=2e-3)
    else:
        sk = SkLogisticRegression(C=1 / (l2 * n), tol=1e-10, max_iter=5000).fit(xs, y)
        # softmax weights are defined up to a shift shared by the classes: compare centred ones
        ours = probe.weight.numpy().T
        np.testing.assert_allclose(ours - ours.mean(0), sk.coef_ - sk.coef_.mean(0), atol=2e-3)
        np.testing.assert_allclose(probe.predict_proba(x).numpy(), sk.predict_proba(xs), atol=1e-3)


def test_unlabelled_entries_do_not_change_the_fit():
    (x, y), _ = _planted_attributes(300, 8, 2, seed=1)
    masked = y.copy()
    masked[:100, 1] = -1  # attribute 1 unlabelled for the first 100 samples
    norm = standardizer(x)
    joint = fit_logistic_regression(x, torch.as_tensor(masked), 1e-3, True, standardize=norm, tol=1e-7)
    alone = fit_logistic_regression(
        x[100:], torch.as_tensor(y[100:, 1:]), 1e-3, True, standardize=norm, tol=1e-7
    )
    torch.testing.assert_close(joint.weight[:, 1], alone.weight[:, 0], atol=1e-4, rtol=1e-3)


def test_probe_recovers_a_planted_linear_signal_for_attributes():
    (x, y), (test_x, test_y), w = _planted_attributes(3000, 32, 5, seed=2, noise=0.05, draws=2)
    names = [f"a{i}" for i in range(5)]
    block = linear_probe((x, y), (test_x, test_y), names, "attributes", fractions=[1.0])["1.0"]
    assert block["summary"]["mean_accuracy"] > 0.95
    assert block["l2_selected_on"] == "held-out 20% of train" and block["n_train"] == 3000
    assert all(m["balanced_accuracy"] > 0.9 for m in block["per_label"].values())
    # the weights point along the planted directions (in the standardised feature space)
    probe = fit_logistic_regression(x, torch.as_tensor(y), block["l2"], True)
    planted = torch.from_numpy(w).float() * standardizer(x)[1][:, None]
    cosine = torch.nn.functional.cosine_similarity(probe.weight, planted, dim=0)
    assert (cosine > 0.95).all(), cosine


def test_probe_recovers_planted_classes_and_reports_its_own_predictions():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(3, 16)) * 2
    labels = rng.integers(0, 3, 1800)
    x = torch.from_numpy((centres[labels] + rng.normal(size=(1800, 16))).astype(np.float32))
    train, val, test = slice(0, 1000), slice(1000, 1300), slice(1300, 1800)
    results = linear_probe(
        (x[train], labels[train]),
        (x[test], labels[test]),
        ["a", "b", "c"],
        "classification",
        val=(x[val], labels[val]),
        fractions=[0.1, 1.0],
    )
    full, few = results["1.0"], results["0.1"]
    assert full["summary"]["accuracy"] > 0.9 and full["l2_selected_on"] == "val"
    assert few["n_train"] == 100 and full["n_train"] == 1000
    # the reported metrics are sklearn's on the probe's own predictions
    probe = fit_logistic_regression(x[train], torch.as_tensor(labels[train]), full["l2"], False, 3)
    pred = probe.predict(x[test]).numpy()
    assert full["summary"]["accuracy"] == pytest.approx(accuracy_score(labels[test], pred))
    assert full["summary"]["mean_per_class_recall"] == pytest.approx(
        recall_score(labels[test], pred, average="macro")
    )
    assert full["confusion_matrix"] == confusion_matrix(labels[test], pred).tolist()


def test_reported_probe_metrics_equal_sklearn_on_the_probe_predictions():
    (x, y), (val_x, val_y), (test_x, test_y), _ = _planted_attributes(300, 10, 3, seed=5, noise=1.0, draws=3)
    names = ["p", "q", "r"]
    results = linear_probe((x, y), (test_x, test_y), names, "attributes", val=(val_x, val_y), fractions=[1.0])
    block = results["1.0"]
    probe = fit_logistic_regression(x, torch.as_tensor(y), block["l2"], True)
    pred = probe.predict(test_x).numpy()
    for a, name in enumerate(names):
        m = block["per_label"][name]
        assert m["accuracy"] == pytest.approx(accuracy_score(test_y[:, a], pred[:, a]))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(test_y[:, a], pred[:, a]))
        assert m["support"] == 300 and m["positives"] == int(test_y[:, a].sum())
    expected = np.mean([balanced_accuracy_score(test_y[:, a], pred[:, a]) for a in range(3)])
    assert block["summary"]["mean_balanced_accuracy"] == pytest.approx(expected)


def test_fractions_are_seeded_subsets():
    a, b = fraction_indices(1000, 0.1, seed=0), fraction_indices(1000, 0.1, seed=0)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 100 and len(set(a)) == 100 and (np.diff(a) > 0).all()
    assert not np.array_equal(a, fraction_indices(1000, 0.1, seed=1))
    assert len(fraction_indices(1000, 0.0001, seed=0)) == 2
    np.testing.assert_array_equal(fraction_indices(7, 1.0, 0), np.arange(7))
    with pytest.raises(ValueError, match=r"fraction 1\.5"):
        fraction_indices(10, 1.5, 0)


@pytest.mark.parametrize("multilabel", [True, False])
def test_hand_written_gradient_equals_autograd(multilabel):
    from flip.evaluation.linear_probe import RegularizedLogLoss

    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64)
    y = torch.randint(-1, 2, (50, 3)) if multilabel else torch.randint(0, 4, (50,))
    k = 3 if multilabel else 4
    weight = torch.randn(6, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(k, dtype=torch.float64, requires_grad=True)
    if multilabel:  # the straightforward reference: a masked mean per attribute, summed
        mask = (y >= 0).double()
        losses = F.binary_cross_entropy_with_logits(
            x @ weight + bias, y.clamp(min=0).double(), reduction="none"
        )
        reference = ((losses * mask).sum(0) / mask.sum(0)).sum()
    else:
        reference = F.cross_entropy(x @ weight + bias, y)
    (reference + 0.5 * 0.3 * weight.square().sum()).backward()
    objective = RegularizedLogLoss(x, y, 0.3, multilabel, k)
    w, b = weight.detach().clone(), bias.detach().clone()
    value = objective(w, b)
    assert value.item() == pytest.approx(reference.item() + 0.15 * weight.detach().square().sum().item())
    torch.testing.assert_close(w.grad, weight.grad)
    torch.testing.assert_close(b.grad, bias.grad)


def _attributes_with_a_question(name: str, n: int, rng: np.random.Generator) -> SplitFeatures:
    """Features with two planted binary attributes (dimensions 0, 1) and a planted 3-way
    question (dimensions 2..4; every tenth sample unlabelled, as bald faces have no hair colour)."""
    x = rng.normal(size=(n, 8)).astype(np.float32)
    shade = np.argmax(x[:, 2:5], axis=1)
    shade[::10] = -1
    split = LabelledSplit(
        "synthetic",
        name,
        "attributes",
        ["p", "q"],
        (x[:, :2] > 0).astype(np.int64),
        ImageFiles(tuple(f"{name}{i}.jpg" for i in range(n))),
        [f"{name}{i}.jpg" for i in range(n)],
        questions={"shade": (["a", "b", "c"], shade)},
    )
    return SplitFeatures(torch.as_tensor(x), split)


def test_an_attribute_splits_questions_get_a_softmax_probe_beside_the_binary_ones():
    rng = np.random.default_rng(6)
    train, val, test = (
        _attributes_with_a_question(n, k, rng) for n, k in (("train", 400), ("val", 100), ("test", 150))
    )
    probe = LinearProbe(train_split="train", fractions=[0.004, 0.1, 1.0], l2_grid=[1.0, 1e-2, 1e-4])
    few = fraction_indices(400, 0.004, probe.seed)  # the 2 faces of the smallest fraction
    train.split.questions["shade"][1][few[0]] = -1
    metrics = probe.metrics(train, test, val, None)
    binary = json.loads(json.dumps(metrics["summary"]))
    add_question_probes(probe, train, test, val, metrics)
    summary = metrics["summary"]
    assert {k: summary[k] for k in binary} == binary  # the binary probes' figures are untouched
    assert summary["shade_accuracy"] > 0.85 and metrics["multiclass"]["shade"]["l2_selected_on"] == "val"
    assert (
        summary == metrics["fractions"]["1.0"]["summary"]
        and "shade_accuracy" in metrics["fractions"]["0.1"]["summary"]
    )
    # one labelled face is too few to fit: that fraction keeps its binary scores only
    assert "shade_accuracy" not in metrics["fractions"]["0.004"]["summary"]
    # the figure: a refit by hand with the chosen l2 on the labelled faces, scored on the labelled ones
    y, y_test = train.split.questions["shade"][1], test.split.questions["shade"][1]
    refit = fit_logistic_regression(
        train.features[y >= 0], torch.as_tensor(y[y >= 0]), metrics["multiclass"]["shade"]["l2"], False, 3
    )
    predicted = refit.predict(test.features[y_test >= 0]).numpy()
    assert summary["shade_accuracy"] == pytest.approx(
        accuracy_score(y_test[y_test >= 0], predicted), abs=1e-9
    )
    assert summary["shade_mean_per_class_recall"] == pytest.approx(
        recall_score(y_test[y_test >= 0], predicted, average="macro"), abs=1e-9
    )
