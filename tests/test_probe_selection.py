"""Honest model selection by default; the papers' selection on the test split only on request, labelled."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from rich.console import Console
from sklearn.metrics import accuracy_score

from flip.benchmarks.base import ImageFiles, LabelledSplit
from flip.evaluation.features import SplitFeatures
from flip.evaluation.linear_probe import AS_PUBLISHED, LinearProbe, fit_logistic_regression, standardizer
from flip.evaluation.report import write_report

from .helpers import compose_eval

GRID = (1.0, 0.1, 0.01, 1e-3, 1e-4)


def _splits(task: str, seed: int = 0) -> dict[str, SplitFeatures]:
    """Few, noisy samples of a planted linear signal: the l2 that scores best differs by split."""
    rng = np.random.default_rng(seed)
    d, k = 16, 3
    w = rng.normal(size=(d, k))
    out = {}
    for split, n in (("train", 60), ("val", 40), ("test", 50)):
        x = rng.normal(size=(n, d)).astype(np.float32)
        scores = x @ w + 1.5 * rng.logistic(size=(n, k))
        if task == "attributes":
            targets, names = (scores > 0).astype(np.int8), ["a", "b", "c"]
        else:
            targets, names = scores.argmax(1).astype(np.int64), ["x", "y", "z"]
        labelled = LabelledSplit(
            benchmark="planted",
            split=split,
            task=task,
            label_names=names,
            targets=targets,
            images=ImageFiles(tuple(f"{split}{i}.png" for i in range(n))),
            keys=[f"{split}{i}" for i in range(n)],
        )
        out[split] = SplitFeatures(torch.from_numpy(x), labelled)
    return out


def _test_score(probe, x: torch.Tensor, y: np.ndarray) -> float:
    """Mean over attributes of per-attribute accuracy, or accuracy over classes, by sklearn."""
    pred = probe.predict(x).numpy()
    if y.ndim == 1:
        return accuracy_score(y, pred)
    return float(np.mean([accuracy_score(y[:, a], pred[:, a]) for a in range(y.shape[1])]))


@pytest.mark.parametrize("task", ["attributes", "classification"])
@pytest.mark.parametrize("with_val", [True, False])
def test_as_published_l2_is_the_test_best_and_the_honest_summary_is_unchanged(task, with_val):
    s = _splits(task)
    val = s["val"] if with_val else None
    settings = {"train_split": "train", "fractions": [0.5, 1.0], "l2_grid": list(GRID), "seed": 3}
    honest = LinearProbe(**settings).metrics(s["train"], s["test"], val, "ckpt")
    published = LinearProbe(**settings, selection="test_as_published").metrics(
        s["train"], s["test"], val, "ckpt"
    )
    extra = published.pop("as_published")
    assert published == honest and "as_published" not in honest  # the option adds, never changes

    # the grid by hand: every l2 fitted on all the training samples, scored on test, first best kept
    x, y = s["train"].features, s["train"].split.targets
    multilabel = task == "attributes"
    by_l2 = {}
    for l2 in GRID:
        probe = fit_logistic_regression(
            x, torch.as_tensor(y), l2, multilabel, None if multilabel else 3, standardizer(x)
        )
        by_l2[l2] = _test_score(probe, s["test"].features, s["test"].split.targets)
    best = max(by_l2.values())
    assert extra["label"] == AS_PUBLISHED == "selected on test, as published"
    assert extra["selected"] == {"l2": next(l2 for l2 in GRID if by_l2[l2] == best)}
    key = "mean_accuracy" if multilabel else "accuracy"
    assert extra["summary"][key] == pytest.approx(best)
    assert len(set(by_l2.values())) > 1  # the choice mattered
    if with_val:  # the same probes, chosen on test instead of val: never below the honest figure
        assert extra["summary"][key] >= honest["summary"][key]


def test_the_report_and_console_label_the_figure_beside_the_honest_one(tmp_path):
    s = _splits("attributes")
    probe = LinearProbe("train", fractions=[1.0], l2_grid=list(GRID), selection="test_as_published")
    metrics = probe.metrics(s["train"], s["test"], s["val"], "ckpt")
    console = Console(file=io.StringIO(), width=240)
    write_report(metrics, tmp_path, console=console, plots=False)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["as_published"] == metrics["as_published"]
    report = (tmp_path / "report.md").read_text()
    honest, published = metrics["summary"], metrics["as_published"]["summary"]
    l2 = metrics["as_published"]["selected"]["l2"]
    assert f"**selected on test, as published** (l2 {l2:g}), beside the honest figure:" in report
    assert "| metric | honest | selected on test, as published |" in report
    row = f"| mean accuracy | {honest['mean_accuracy']:.3f} | {published['mean_accuracy']:.3f} |"
    assert row in report
    shown = console.file.getvalue()
    assert (
        f"selected on test, as published (l2 {l2:g}): mean_accuracy {published['mean_accuracy']:.3f}" in shown
    )

    honest_only = LinearProbe("train", fractions=[1.0], l2_grid=list(GRID)).metrics(
        s["train"], s["test"], s["val"], "ckpt"
    )
    write_report(honest_only, tmp_path / "honest", console=Console(file=io.StringIO()), plots=False)
    assert "as published" not in (tmp_path / "honest" / "report.md").read_text()


def test_selection_is_a_config_option_that_refuses_unknown_values(tmp_path):
    cfg = compose_eval(
        "eval_linear_probe",
        tmp_path,
        "benchmark=celeba",
        "benchmark.root=/data/x",
        "protocols.linear_probe.selection=test_as_published",
    )
    assert instantiate(cfg.protocols.linear_probe, _convert_="all").selection == "test_as_published"
    default = compose_eval("eval_linear_probe", tmp_path, "benchmark=celeba", "benchmark.root=/data/x")
    assert default.protocols.linear_probe.selection == "honest"
    with pytest.raises(ValueError, match="selection 'best' is not one of honest, test_as_published"):
        LinearProbe("train", selection="best")
