"""eval/zeroshot.py, eval/linear_probe.py and eval/retrieval.py: configs, outputs and their numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import get_method, instantiate
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, recall_score

from flip.evaluation import features as features_module
from flip.evaluation.prompts import choice_prompts
from flip.evaluation.retrieval import retrieval_recalls

from .helpers import (
    CONF,
    ROOT,
    compose_eval,
    eval_overrides,
    flip_root_env,
    run_linear_probe,
    run_retrieval,
    run_zeroshot,
)

BENCHMARKS = tuple(sorted(path.stem for path in (CONF / "benchmark").glob("*.yaml")))  # a new one included
VERIFICATION = ("calfw", "cplfw", "lfw")  # pairs only: nothing to train a probe on
SCHEMA = {
    "benchmark",
    "protocol",
    "task",
    "checkpoint",
    "split",
    "n_train",
    "n_test",
    "labels",
    "summary",
    "per_label",
}


@torch.no_grad()
def _features(model, paths):
    images = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in paths])
    return model.encode_image(images, normalize=True)


@torch.no_grad()
def _ensemble(model, templates, phrases):
    text = model.encode_text(
        model.tokenize([t.format(p) for t in templates for p in phrases]), normalize=True
    )
    return F.normalize(text.mean(0), dim=-1)


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_every_benchmark_config_composes_with_a_reader(tmp_path, benchmark):
    cfg = compose_eval("eval_zeroshot", tmp_path, f"benchmark={benchmark}", "benchmark.root=/data/x")
    assert cfg.benchmark.name == benchmark
    assert callable(get_method(cfg.benchmark.reader._target_))
    if benchmark != "faceshapes":
        assert cfg.benchmark.reader.root == "/data/x"
    assert cfg.split == cfg.benchmark.test_split
    if benchmark in VERIFICATION:  # no probe split: checked as what it is, the verification entry point's
        assert cfg.benchmark.train_split is None and cfg.benchmark.val_split is None and cfg.split == "test"
        verification = compose_eval(
            "eval_verification", tmp_path, f"benchmark={benchmark}", "benchmark.root=/x"
        )
        assert (
            verification.protocols.verification.flip_test is True and verification.benchmark.name == benchmark
        )
        return
    probe = compose_eval("eval_linear_probe", tmp_path, f"benchmark={benchmark}", "benchmark.root=/data/x")
    settings = probe.protocols.linear_probe
    if probe.benchmark.train_split is None:  # no labels to fit (celeba_caption: captions only)
        assert settings.train_split is None
        with pytest.raises(ValueError, match="has no train split, so there is nothing to fit"):
            instantiate(settings, _convert_="all")(None, SimpleNamespace(benchmark=cfg.benchmark))
        return
    assert list(settings.fractions) == [0.01, 0.1, 1.0] and settings.train_split == "train"
    assert settings.val_split == probe.benchmark.val_split


def test_zeroshot_classification_matches_an_independent_computation(tmp_path, tiny_ckpt, folder_benchmark):
    import flip

    cfg = compose_eval(
        "eval_zeroshot", tmp_path, *eval_overrides(tmp_path, tiny_ckpt, "folder", folder_benchmark)
    )
    metrics = run_zeroshot(cfg)
    out = tmp_path / "out"
    written = json.loads((out / "metrics.json").read_text())
    assert (
        set(written) >= SCHEMA and written["protocol"] == "zeroshot" and written["task"] == "classification"
    )
    assert (
        written["labels"] == ["blue", "green", "red"] and written["n_test"] == 12 and written["n_train"] == 0
    )
    assert set(written["summary"]) == {"accuracy", "mean_per_class_recall"}
    assert set(written["per_label"]["red"]) == {"recall", "support"}
    assert (out / "report.md").read_text().count("|") > 20
    assert (out / "per_label.png").stat().st_size > 1000 and (
        out / "confusion_matrix.png"
    ).stat().st_size > 1000

    # the same decisions computed by hand: one prompt ensemble per class, argmax of similarity
    model = flip.load(tiny_ckpt)
    paths = sorted((folder_benchmark / "test").rglob("*.png"))
    truth = np.array([written["labels"].index(p.parent.name) for p in paths])
    classes = torch.stack(
        [_ensemble(model, cfg.benchmark.templates, choice_prompts(c)) for c in written["labels"]]
    )
    pred = (_features(model, paths) @ classes.T).argmax(1).numpy()
    assert written["summary"]["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert written["summary"]["mean_per_class_recall"] == pytest.approx(
        recall_score(truth, pred, average="macro")
    )
    assert written["confusion_matrix"] == confusion_matrix(truth, pred).tolist()
    assert metrics["per_label"] == written["per_label"]


def test_zeroshot_attributes_match_sklearn_on_the_same_decisions(tmp_path, tiny_ckpt, csv_benchmark):
    import flip

    prompts = "benchmark.binary={is_red:{positive:[red],negative:['not red']}}"
    cfg = compose_eval(
        "eval_zeroshot", tmp_path, *eval_overrides(tmp_path, tiny_ckpt, "csv", csv_benchmark), prompts
    )
    written = run_zeroshot(cfg)
    assert written["task"] == "attributes" and written["labels"] == ["is_red", "is_blue"]
    assert set(written["summary"]) == {"mean_accuracy", "mean_balanced_accuracy"}
    assert written["default_prompts_for"] == ["is_blue"]  # no YAML prompts: the built-in rule
    model = flip.load(tiny_ckpt)
    rows = [line.split(",") for line in (csv_benchmark / "test.csv").read_text().splitlines()[1:]]
    image = _features(model, [csv_benchmark / r[0] for r in rows])
    templates, scale = cfg.benchmark.templates, model.logit_scale.exp().item()
    sides = {
        "is_red": (["red"], ["not red"]),
        "is_blue": (["with is blue"], ["without is blue"]),
    }
    for a, name in enumerate(("is_red", "is_blue")):
        pos, neg = (_ensemble(model, templates, phrases) for phrases in sides[name])
        p = torch.softmax(scale * torch.stack([image @ pos, image @ neg], dim=1), dim=1)[:, 0]
        pred, truth = (p > 0.5).numpy(), np.array([int(r[1 + a]) for r in rows])
        m = written["per_label"][name]
        assert m["accuracy"] == pytest.approx(accuracy_score(truth, pred))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))
        assert m["recall_positive"] == pytest.approx(recall_score(truth, pred, pos_label=1))
        assert m["recall_negative"] == pytest.approx(recall_score(truth, pred, pos_label=0))
        assert m["support"] == 12 and m["positives"] == truth.sum()
        # the report's row gives both recalls beside the balanced accuracy they average
        row = next(
            line
            for line in (tmp_path / "out" / "report.md").read_text().splitlines()
            if f"| {name} |" in line
        )
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2:5] == [
            f"{m[k]:.3f}" for k in ("balanced_accuracy", "recall_positive", "recall_negative")
        ]


def test_linear_probe_entry_point_caches_features_and_reports_every_fraction(
    tmp_path, tiny_ckpt, csv_benchmark, monkeypatch
):
    overrides = [
        *eval_overrides(tmp_path, tiny_ckpt, "csv", csv_benchmark),
        "protocols.linear_probe.val_split=val",
        "protocols.linear_probe.l2_grid=[1.0,0.01]",
    ]
    metrics = run_linear_probe(compose_eval("eval_linear_probe", tmp_path, *overrides))
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(written) >= SCHEMA and written["protocol"] == "linear_probe"
    assert written["n_train"] == 24 and written["n_test"] == 12 and written["val_split"] == "val"
    assert set(written["fractions"]) == {"0.01", "0.1", "1.0"}
    assert [b["n_train"] for b in written["fractions"].values()] == [2, 2, 24]
    assert written["l2"] in (1.0, 0.01) and written["summary"] == written["fractions"]["1.0"]["summary"]
    assert (tmp_path / "out" / "per_label.png").is_file()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3  # train, val, test

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should have come from the cache")

    monkeypatch.setattr(features_module, "extract_image_features", no_extraction)
    again = run_linear_probe(compose_eval("eval_linear_probe", tmp_path, *overrides))
    assert again["fractions"] == metrics["fractions"]
    # a different checkpoint is a different cache key
    os.utime(tiny_ckpt, ns=(1, 1))
    with pytest.raises(AssertionError, match="from the cache"):
        run_linear_probe(compose_eval("eval_linear_probe", tmp_path, *overrides))


def test_retrieval_recalls_equal_a_naive_ranking(tmp_path, tiny_ckpt, csv_benchmark, folder_benchmark):
    import flip

    cfg = compose_eval("eval_retrieval", tmp_path, *eval_overrides(tmp_path, tiny_ckpt, "csv", csv_benchmark))
    written = run_retrieval(cfg)
    assert written["task"] == "retrieval" and set(written["summary"]) == {
        f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)
    }
    model = flip.load(tiny_ckpt)
    rows = [line.split(",") for line in (csv_benchmark / "test.csv").read_text().splitlines()[1:]]
    image = _features(model, [csv_benchmark / r[0] for r in rows])
    with torch.no_grad():
        text = model.encode_text(model.tokenize([r[3] for r in rows]), normalize=True)
    sim = (image @ text.T).numpy()
    for k in (1, 5, 10):
        assert written["summary"][f"i2t_R@{k}"] == pytest.approx(
            np.mean([i in np.argsort(-sim[i])[:k] for i in range(12)])
        )
        assert written["summary"][f"t2i_R@{k}"] == pytest.approx(
            np.mean([i in np.argsort(-sim[:, i])[:k] for i in range(12)])
        )
    assert written["summary"] == pytest.approx(retrieval_recalls(image, text))
    with pytest.raises(ValueError, match="has no captions"):
        run_retrieval(
            compose_eval(
                "eval_retrieval", tmp_path, *eval_overrides(tmp_path, tiny_ckpt, "folder", folder_benchmark)
            )
        )


@pytest.mark.slow
def test_eval_script_runs_from_the_command_line(tmp_path, tiny_ckpt, folder_benchmark):
    out = tmp_path / "cli"
    command = [
        sys.executable,
        "eval/zeroshot.py",
        *eval_overrides(tmp_path, tiny_ckpt, "folder", folder_benchmark, "cli"),
    ]
    env = flip_root_env(tmp_path, threads=None)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["benchmark"] == "folder"
    assert (out / ".hydra" / "config.yaml").is_file() and "accuracy" in done.stdout


def test_a_missing_benchmark_root_says_what_to_give(tmp_path, tiny_ckpt):
    overrides = [
        o for o in eval_overrides(tmp_path, tiny_ckpt, "rafdb", "x") if not o.startswith("benchmark.root")
    ]
    with pytest.raises(ValueError, match=r"benchmark.root is not set: give benchmark.root=DIR.*rafdb"):
        run_zeroshot(compose_eval("eval_zeroshot", tmp_path, *overrides))
    with pytest.raises(FileNotFoundError, match=r"RAF-DB label file: none of .*list_patition_label.txt"):
        run_zeroshot(
            compose_eval("eval_zeroshot", tmp_path, *eval_overrides(tmp_path, tiny_ckpt, "rafdb", tmp_path))
        )
