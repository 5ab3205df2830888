"""Age, gender and race: the regression metrics, the ridge, the expected age, subgroup metrics,
and the demo checkpoint through eval/zeroshot.py and eval/linear_probe.py on UTKFace and
FairFace fixtures, each figure checked against an independent computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_absolute_error

from flip.benchmarks import read_utkface
from flip.benchmarks.base import ImageFiles, LabelledSplit
from flip.benchmarks.fairface import AGE_GROUPS, FAIRFACE_RACES, GENDERS, age_group_of
from flip.evaluation import token_probe
from flip.evaluation.features import SplitFeatures
from flip.evaluation.linear_probe import LinearProbe, fit_logistic_regression, standardizer
from flip.evaluation.metrics import regression_metrics
from flip.evaluation.multitask import MultitaskPredictions, QuestionPredictions, ValuePredictions
from flip.evaluation.multitask_probe import multitask_probe_metrics
from flip.evaluation.ridge import fit_ridge, select_ridge
from flip.evaluation.subgroups import subgroup_labels, subgroup_metrics
from flip.evaluation.zeroshot import expected_ages

from .helpers import compose_eval, eval_overrides, run_linear_probe, run_zeroshot
from .helpers.demographics import write_fairface, write_utkface
from .helpers.evaluation import run_token_probe


def test_mae_and_cs5_equal_sklearn_and_numpy_on_the_labelled_samples():
    rng = np.random.default_rng(0)
    true = rng.uniform(1, 90, 200)
    true[::7] = np.nan  # unlabelled
    predicted = true + rng.normal(0, 6, 200)
    predicted[3] = true[3] + 5.0  # exactly 5 off counts as within
    m = regression_metrics(true, predicted)
    keep = ~np.isnan(true)
    assert m["n"] == keep.sum()
    assert m["mae"] == pytest.approx(mean_absolute_error(true[keep], predicted[keep]))
    assert m["cs5"] == pytest.approx(np.mean(np.abs(true[keep] - predicted[keep]) <= 5))


def test_ridge_equals_sklearn_on_the_same_standardised_features_and_alpha():
    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.normal(size=(80, 6)) * [1, 10, 0.1, 3, 1, 2] + 5, dtype=torch.float32)
    y = x.numpy() @ [1.0, 0.2, -3.0, 0.0, 0.5, 1.0] + rng.normal(0, 0.5, 80) + 30
    x_new = torch.as_tensor(rng.normal(size=(20, 6)) + 5, dtype=torch.float32)
    mean, scale = standardizer(x)
    standardise = lambda t: ((t - mean) / scale).double().numpy()  # noqa: E731
    for alpha in (0.1, 10.0, 1000.0):
        ours = fit_ridge(x, y, alpha)
        reference = Ridge(alpha=alpha).fit(standardise(x), y)
        np.testing.assert_allclose(
            ours.predict(x_new).numpy(), reference.predict(standardise(x_new)), rtol=1e-6
        )
        np.testing.assert_allclose(ours.weight.numpy(), reference.coef_, rtol=1e-6, atol=1e-8)
    # alpha chosen by MAE on held-out samples: each alpha's error is sklearn's, the best the lowest
    best, errors = select_ridge(x[:60], y[:60], x[60:], y[60:], [0.01, 1.0, 100.0, 1e4])
    fit_mean, fit_scale = standardizer(x[:60])
    for alpha, error in errors.items():
        reference = Ridge(alpha=alpha).fit(((x[:60] - fit_mean) / fit_scale).double().numpy(), y[:60])
        held = reference.predict(((x[60:] - fit_mean) / fit_scale).double().numpy())
        assert error == pytest.approx(mean_absolute_error(y[60:], held), rel=1e-6)
    assert best.alpha == min(errors, key=errors.get)


def test_subgroup_metrics_equal_per_group_figures_by_hand():
    gender = np.array([0, 0, 0, 1, 1, 1, 1, -1])
    race = np.array([0, 1, 2, 0, 1, 2, 2, 0])
    race_pred = np.array([0, 1, 1, 0, 2, 2, 2, 1])
    age = np.array([20, 30, 40, 50, 60, 70, np.nan, 10.0])
    age_pred = np.array([22, 36, 40, 50, 50, 71, 30, 10.0])
    predictions = MultitaskPredictions(
        {"race": QuestionPredictions(["a", "b", "c"], race, race_pred)},
        {"age": ValuePredictions(age, age_pred)},
    )
    groups = {"gender": (["Male", "Female", "Other"], gender)}
    out = subgroup_metrics(predictions, groups)["gender"]
    assert out["unlabelled"] == 1  # the sample without a gender is in no group
    male, female = out["groups"]["Male"], out["groups"]["Female"]
    assert male["support"] == 3 and female["support"] == 4 and out["groups"]["Other"]["support"] == 0
    assert male["race_accuracy"] == pytest.approx(2 / 3)  # samples 0, 1, 2: right, right, wrong
    assert female["race_accuracy"] == pytest.approx(3 / 4)
    assert female["race_mean_per_class_recall"] == pytest.approx(np.mean([1, 0, 1]))
    assert male["age_mae"] == pytest.approx(np.mean([2, 6, 0]))
    assert female["age_mae"] == pytest.approx(np.mean([0, 10, 1]))  # the NaN age left out
    assert male["age_cs5"] == pytest.approx(2 / 3) and female["age_cs5"] == pytest.approx(2 / 3)
    assert np.isnan(out["groups"]["Other"]["race_accuracy"])
    assert out["gap"]["race_accuracy"] == {
        "gap": pytest.approx(3 / 4 - 2 / 3),
        "best": "Female",
        "worst": "Male",
    }
    assert out["gap"]["age_mae"] == {"gap": pytest.approx(11 / 3 - 8 / 3), "best": "Male", "worst": "Female"}


def test_expected_age_is_the_mean_age_under_a_softmax_over_age_prompts(tiny_model):
    templates = ["a photo of a {} year old person.", "a face aged {}."]
    image = F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    ours = expected_ages(tiny_model, image, templates, 1, 12)
    with torch.no_grad():
        rows = []
        for age in range(1, 13):
            tokens = tiny_model.tokenize([t.format(age) for t in templates])
            rows.append(F.normalize(tiny_model.encode_text(tokens, normalize=True).mean(0), dim=-1))
        logits = tiny_model.logit_scale.exp() * image @ torch.stack(rows).T
    p = np.exp(logits.double().numpy() - logits.double().numpy().max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(ours, p @ np.arange(1, 13), rtol=1e-5)


def _features_split(name: str, n: int, rng: np.random.Generator, with_age: bool = True) -> SplitFeatures:
    """Features with planted labels: gender in dimension 0, age in dimension 1, race in 2..4."""
    x = rng.normal(size=(n, 8)).astype(np.float32)
    gender = (x[:, 0] > 0).astype(np.int64)
    race = np.argmax(x[:, 2:5], axis=1)
    age = np.clip(40 + 15 * x[:, 1] + rng.normal(0, 1, n), 0, 100)
    split = LabelledSplit(
        "synthetic",
        name,
        "multitask",
        [],
        np.zeros((n, 0), np.int64),
        ImageFiles(tuple(f"{name}{i}.jpg" for i in range(n))),
        [f"{name}{i}.jpg" for i in range(n)],
        questions={
            "gender": (list(GENDERS), gender),
            "race": (["a", "b", "c"], race),
            "age_group": (list(AGE_GROUPS), age_group_of(age)),
        },
        values={"age": age} if with_age else {},
    )
    return SplitFeatures(torch.as_tensor(x), split)


@pytest.mark.parametrize("with_val", [True, False])
def test_multitask_probe_finds_planted_labels_and_its_figures_are_refits_by_hand(with_val):
    rng = np.random.default_rng(2)
    train, test = _features_split("train", 300, rng), _features_split("test", 120, rng)
    val = _features_split("val", 80, rng) if with_val else None
    probe = LinearProbe(train_split="train", fractions=[0.1, 1.0], l2_grid=[1.0, 1e-2, 1e-4])
    metrics = multitask_probe_metrics(probe, train, test, val, "synthetic.ckpt", subgroups=["gender", "race"])
    assert metrics["task"] == "multitask" and set(metrics["fractions"]) == {"0.1", "1.0"}
    assert metrics["summary"]["gender_accuracy"] > 0.9 and metrics["summary"]["age_mae"] < 3
    where = "val" if with_val else "held-out 20% of train"
    age = metrics["regression"]["age"]
    assert age["alpha_selected_on"] == where and metrics["multiclass"]["gender"]["l2_selected_on"] == where
    # the ridge: sklearn's on the train features standardised by train, with the chosen alpha
    mean, scale = standardizer(train.features)
    reference = Ridge(alpha=age["alpha"]).fit(
        ((train.features - mean) / scale).double().numpy(), train.split.values["age"]
    )
    expected = reference.predict(((test.features - mean) / scale).double().numpy())
    np.testing.assert_allclose(age["predicted"], expected, atol=1e-3)
    assert age["mae"] == pytest.approx(mean_absolute_error(test.split.values["age"], expected), abs=1e-4)
    assert age["cs5"] == pytest.approx(np.mean(np.abs(test.split.values["age"] - expected) <= 5))
    # the gender probe refit with its chosen l2 gives the reported accuracy, overall and per race
    gender = train.split.questions["gender"][1]
    if with_val:
        refit = fit_logistic_regression(
            train.features, torch.as_tensor(gender), metrics["multiclass"]["gender"]["l2"], False, 2
        )
        predicted = refit.predict(test.features).numpy()
        truth, race = test.split.questions["gender"][1], test.split.questions["race"][1]
        assert metrics["summary"]["gender_accuracy"] == pytest.approx(np.mean(predicted == truth), abs=1e-9)
        for index, group in enumerate(["a", "b", "c"]):
            by_hand = np.mean(predicted[race == index] == truth[race == index])
            assert metrics["subgroups"]["race"]["groups"][group]["gender_accuracy"] == pytest.approx(by_hand)
            assert metrics["subgroups"]["race"]["groups"][group]["support"] == (race == index).sum()
    assert set(metrics["subgroups"]) == {"gender", "race"}


def test_multitask_as_published_picks_each_regulariser_on_test_and_leaves_the_honest_figure():
    rng = np.random.default_rng(3)
    train, test, val = (_features_split(n, k, rng) for n, k in (("train", 200), ("test", 90), ("val", 60)))
    settings = {"train_split": "train", "fractions": [1.0], "l2_grid": [1.0, 1e-2, 1e-4]}
    honest = multitask_probe_metrics(LinearProbe(**settings), train, test, val, None)
    both = multitask_probe_metrics(
        LinearProbe(**settings, selection="test_as_published"), train, test, val, None
    )
    assert both["summary"] == honest["summary"] and "as_published" not in honest
    published = both["as_published"]
    assert published["label"] == "selected on test, as published"
    # the alpha a sweep scored on the test split itself would choose, by hand
    _, errors = select_ridge(
        train.features,
        train.split.values["age"],
        test.features,
        test.split.values["age"],
        LinearProbe.alpha_grid,
    )
    assert published["selected"]["age"] == {"alpha": min(errors, key=lambda a: (errors[a], -a))}
    assert published["summary"]["age_mae"] == pytest.approx(min(errors.values()), abs=1e-4)
    assert published["summary"]["age_mae"] <= honest["summary"]["age_mae"] + 1e-9
    assert set(published["selected"]) == {"gender", "race", "age_group", "age"}


# -- the demo checkpoint end to end ------------------------------------------------------------


def _utkface(tmp_path):
    ages = [1, 4, 8, 12, 17, 22, 26, 29, 33, 37, 41, 46, 52, 57, 63, 68, 72, 80, 88, 95]
    well_formed = [(ages[i % len(ages)], i % 2, (i // 2) % 5) for i in range(40)]
    write_utkface(tmp_path / "utk" / "UTKFace", well_formed)
    return tmp_path / "utk"


def _fairface(tmp_path):
    rows = {
        split: [
            (f"{split}/{i}.jpg", AGE_GROUPS[i % 9], GENDERS[i % 2], FAIRFACE_RACES[(i // 2) % 7])
            for i in range(1, n + 1)
        ]
        for split, n in (("train", 24), ("val", 12))
    }
    return write_fairface(tmp_path / "fairface", paddings=("025",), rows=rows)


@torch.no_grad()
def _image_features(model, paths):
    images = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in paths])
    return model.encode_image(images, normalize=True)


def _check_outputs(out, metrics, split, subgroups=("gender", "race", "age_group")):
    written = json.loads((out / "metrics.json").read_text())
    assert written["task"] == "multitask" and written["split"] == split
    assert set(written["subgroups"]) == set(subgroups)
    for block in written["subgroups"].values():
        assert sum(g["support"] for g in block["groups"].values()) + block["unlabelled"] == written["n_test"]
        assert set(block["gap"]) <= set(written["summary"])
    report = (out / "report.md").read_text()
    assert "Per gender (gap: best minus worst group with samples):" in report and "| **gap** |" in report
    assert (out / "subgroups.png").stat().st_size > 1000 and (out / "confusion_race.png").is_file()
    assert metrics["summary"] == written["summary"]
    return written, report


def test_demo_checkpoint_zeroshot_on_utkface_and_fairface(tmp_path, trained_demo):
    import flip

    model = flip.load(trained_demo.ckpt)
    root = _utkface(tmp_path)
    cfg = compose_eval(
        "eval_zeroshot", tmp_path, *eval_overrides(tmp_path, trained_demo.ckpt, "utkface", root, "utk_out")
    )
    written, report = _check_outputs(tmp_path / "utk_out", run_zeroshot(cfg), "test")
    assert written["split_info"]["test"]["seed"] == 0 and written["n_test"] == 8
    assert written["skipped"]["test"]["race_missing"] == 1 and written["skipped"]["test"]["missing_dot"] == 1
    age = written["regression"]["age"]
    assert set(written["summary"]) >= {
        "age_mae",
        "age_cs5",
        "age_bucket_accuracy",
        "gender_accuracy",
        "race_accuracy",
    }
    # the expected ages, by hand from the images, and their MAE, CS@5 and buckets
    paths = [root / "UTKFace" / k for k in read_utkface(root, "test").keys]
    images = _image_features(model, paths)
    ages = expected_ages(model, images, cfg.benchmark.age.templates, 1, 100)
    true = np.array([float(p.name.split("_")[0]) for p in paths])
    np.testing.assert_allclose(age["predicted"], ages, atol=1e-3)
    assert age["true"] == true.tolist()
    assert written["summary"]["age_mae"] == pytest.approx(mean_absolute_error(true, ages))
    assert written["summary"]["age_cs5"] == pytest.approx(np.mean(np.abs(true - ages) <= 5))
    assert written["summary"]["age_bucket_accuracy"] == pytest.approx(
        np.mean(age_group_of(ages) == age_group_of(true))
    )
    # gender by its class prompt ensembles, by hand; then its accuracy per race group
    templates = list(cfg.benchmark.templates)
    classes = []
    for phrases in cfg.benchmark.multiclass.gender.values():
        with torch.no_grad():
            text = model.encode_text(
                model.tokenize([t.format(p) for t in templates for p in phrases]), normalize=True
            )
        classes.append(F.normalize(text.mean(0), dim=-1))
    predicted = (images @ torch.stack(classes).T).argmax(1).numpy()
    gender = np.array([int(p.name.split("_")[1]) for p in paths])
    race = np.array([int(p.name.split("_")[2]) for p in paths])
    assert written["summary"]["gender_accuracy"] == pytest.approx(np.mean(predicted == gender))
    for index, group in enumerate(["White", "Black", "Asian", "Indian", "Others"]):
        scored = written["subgroups"]["race"]["groups"][group]
        assert scored["support"] == (race == index).sum()
        if scored["support"]:
            assert scored["gender_accuracy"] == pytest.approx(
                np.mean(predicted[race == index] == gender[race == index])
            )
    assert (tmp_path / "utk_out" / "age_scatter.png").stat().st_size > 1000 and "**age**: MAE" in report

    fairface = _fairface(tmp_path)
    cfg = compose_eval(
        "eval_zeroshot", tmp_path, *eval_overrides(tmp_path, trained_demo.ckpt, "fairface", fairface, "ff")
    )
    written, report = _check_outputs(tmp_path / "ff", run_zeroshot(cfg), "val")
    assert written["split_info"]["val"]["padding"] == 0.25 and written["n_test"] == 12
    assert set(written["regression"]["age"]) == {"bucket_accuracy", "bucket_support", "buckets"}
    assert "age_mae" not in written["summary"] and not (tmp_path / "ff" / "age_scatter.png").exists()
    images = _image_features(
        model, [fairface / "fairface-img-margin025-trainval" / f"val/{i}.jpg" for i in range(1, 13)]
    )
    buckets = age_group_of(expected_ages(model, images, cfg.benchmark.age.templates, 1, 100))
    truth = np.array([i % 9 for i in range(1, 13)])
    assert written["summary"]["age_bucket_accuracy"] == pytest.approx(np.mean(buckets == truth))


def test_demo_checkpoint_linear_probe_on_utkface_and_fairface(tmp_path, trained_demo):
    root = _utkface(tmp_path)
    overrides = [
        *eval_overrides(tmp_path, trained_demo.ckpt, "utkface", root, "utk_out"),
        "protocols.linear_probe.l2_grid=[1.0,0.01]",
    ]
    metrics = run_linear_probe(compose_eval("eval_linear_probe", tmp_path, *overrides))
    written, report = _check_outputs(tmp_path / "utk_out", metrics, "test")
    assert (
        written["val_split"] == "val"
        and written["n_train"] == 28
        and set(written["fractions"]) == {"0.01", "0.1", "1.0"}
    )
    age = written["regression"]["age"]
    assert age["alpha_selected_on"] == "val" and age["n"] == 8
    assert age["mae"] == pytest.approx(mean_absolute_error(age["true"], age["predicted"]), abs=1e-3)
    assert written["summary"]["age_mae"] == age["mae"]
    assert "chosen on val: gender l2" in report and (tmp_path / "utk_out" / "age_scatter.png").is_file()
    assert not (tmp_path / "utk_out" / "per_label.png").exists()

    fairface = _fairface(tmp_path)
    overrides = [
        *eval_overrides(tmp_path, trained_demo.ckpt, "fairface", fairface, "ff"),
        "protocols.linear_probe.l2_grid=[1.0,0.01]",
    ]
    written, _ = _check_outputs(
        tmp_path / "ff", run_linear_probe(compose_eval("eval_linear_probe", tmp_path, *overrides)), "val"
    )
    assert written["val_split"] is None and written["train_split"] == "train" and "regression" not in written
    assert written["multiclass"]["race"]["l2_selected_on"] == "held-out 20% of train"


def test_demo_checkpoint_token_probe_on_utkface_reports_subgroups_and_the_age_scatter(
    tmp_path, trained_demo, monkeypatch
):
    outputs = []  # every head output the probe computes; the last is the test split's at the chosen epoch

    def recording(*args, **kwargs):
        outputs.append(predict(*args, **kwargs))
        return outputs[-1]

    predict = token_probe.predict
    monkeypatch.setattr(token_probe, "predict", recording)
    root = _utkface(tmp_path)
    overrides = [
        *eval_overrides(tmp_path, trained_demo.ckpt, "utkface", root, "utk_out"),
        "protocols.token_probe.epochs=3",
    ]
    metrics = run_token_probe(compose_eval("eval_token_probe", tmp_path, *overrides))
    written, report = _check_outputs(tmp_path / "utk_out", metrics, "test")
    assert written["protocol"] == "token_probe" and written["n_test"] == 8
    assert written["selected"]["on"] == "val" and len(written["selected"]["scores"]) == 3
    # its own predictions, read by hand: the class logits per question in the split's order, then age
    test = read_utkface(root, "test")
    logits, start, predicted = outputs[-1].numpy(), 0, {}
    assert logits.shape == (8, 2 + 5 + len(AGE_GROUPS) + 1)
    for name, (classes, _) in test.questions.items():
        predicted[name] = logits[:, start : start + len(classes)].argmax(1)
        start += len(classes)
    paths = [root / "UTKFace" / k for k in test.keys]
    age = np.array([float(p.name.split("_")[0]) for p in paths])
    truth = {
        "gender": np.array([int(p.name.split("_")[1]) for p in paths]),
        "race": np.array([int(p.name.split("_")[2]) for p in paths]),
        "age_group": age_group_of(age),
    }
    block = written["regression"]["age"]
    assert block["true"] == age.tolist() and block["n"] == 8
    age_pred = np.array(block["predicted"])
    assert written["summary"]["age_mae"] == pytest.approx(mean_absolute_error(age, age_pred), abs=1e-3)
    assert written["summary"]["race_accuracy"] == pytest.approx(np.mean(predicted["race"] == truth["race"]))
    # every group's figures by hand from those predictions
    names = {"gender": list(GENDERS), "race": ["White", "Black", "Asian", "Indian", "Others"]}
    names["age_group"] = list(AGE_GROUPS)
    for question, groups in names.items():
        for index, group in enumerate(groups):
            scored, members = written["subgroups"][question]["groups"][group], truth[question] == index
            assert scored["support"] == members.sum()
            if not members.any():
                assert np.isnan(scored["race_accuracy"]) and np.isnan(scored["age_mae"])
                continue
            for other in ("gender", "race"):
                right = predicted[other][members] == truth[other][members]
                assert scored[f"{other}_accuracy"] == pytest.approx(right.mean())
            errors = np.abs(age_pred[members] - age[members])
            assert scored["age_mae"] == pytest.approx(errors.mean(), abs=1e-3)
            assert scored["age_cs5"] == pytest.approx(np.mean(errors <= 5))
    assert (tmp_path / "utk_out" / "age_scatter.png").stat().st_size > 1000 and "**age**: MAE" in report

    fairface = _fairface(tmp_path)  # ages in buckets only: subgroups, no regression and no scatter
    overrides = [
        *eval_overrides(tmp_path, trained_demo.ckpt, "fairface", fairface, "ff"),
        "protocols.token_probe.epochs=2",
    ]
    metrics = run_token_probe(compose_eval("eval_token_probe", tmp_path, *overrides))
    written, _ = _check_outputs(tmp_path / "ff", metrics, "val")
    assert written["selected"]["on"] == "held-out 20% of train (not refit)" and "regression" not in written
    assert not (tmp_path / "ff" / "age_scatter.png").exists()


def test_a_subgroup_the_split_does_not_label_is_named_with_the_questions_it_has():
    split = _features_split("test", 10, np.random.default_rng(3)).split
    with pytest.raises(
        ValueError,
        match=r"subgroups \['skin_tone'\] are not questions of the split; "
        r"it has \['gender', 'race', 'age_group'\]",
    ):
        subgroup_labels(split, ["gender", "skin_tone"])
    assert list(subgroup_labels(split, ["race"])) == ["race"]
