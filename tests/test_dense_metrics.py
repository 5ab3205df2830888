"""Dense metrics against direct numpy computations: FaRL's parsing F1 and mIoU from one confusion
matrix, NME with a given normaliser, failure rate and the AUC of the cumulative error curve."""

from __future__ import annotations

import numpy as np
import pytest

from flip.benchmarks.dense import IGNORE
from flip.evaluation.dense_metrics import confusion_matrix, landmark_scores, nme_per_face, parsing_scores

CLASSES = ["background", "skin", "hair", "eye", "hat"]


def test_parsing_f1_and_iou_equal_a_pixel_count_over_all_images():
    rng = np.random.default_rng(0)
    # three "images" of different sizes, scored together; hat (4) never appears anywhere
    truths = [rng.integers(0, 4, size=s) for s in ((7, 9), (5, 5), (11, 3))]
    preds = [np.where(rng.random(t.shape) < 0.6, t, rng.integers(0, 4, size=t.shape)) for t in truths]
    truths[0][0, :4] = IGNORE  # padding: counted nowhere
    preds[0][0, :4] = 3
    confusion = sum(confusion_matrix(t, p, len(CLASSES)) for t, p in zip(truths, preds, strict=True))
    scores = parsing_scores(confusion, CLASSES)

    t = np.concatenate([a.ravel() for a in truths])
    p = np.concatenate([a.ravel() for a in preds])
    p, t = p[t != IGNORE], t[t != IGNORE]
    f1, iou = {}, {}
    for c, name in enumerate(CLASSES):
        tp, fp, fn = np.sum((t == c) & (p == c)), np.sum((t != c) & (p == c)), np.sum((t == c) & (p != c))
        if tp + fp + fn == 0:
            assert scores["per_label"][name]["f1"] is None and scores["per_label"][name]["iou"] is None
            continue
        f1[name], iou[name] = 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)
        assert scores["per_label"][name]["f1"] == pytest.approx(f1[name])
        assert scores["per_label"][name]["iou"] == pytest.approx(iou[name])
        assert scores["per_label"][name]["support"] == np.sum(t == c)
        assert scores["per_label"][name]["predicted"] == np.sum(p == c)
    assert set(f1) == {"background", "skin", "hair", "eye"}
    assert scores["summary"]["mean_f1"] == pytest.approx(np.mean([f1[n] for n in ("skin", "hair", "eye")]))
    assert scores["summary"]["miou"] == pytest.approx(np.mean(list(iou.values())))
    assert scores["summary"]["pixel_accuracy"] == pytest.approx(np.mean(p == t))
    assert scores["n_pixels"] == len(t) == 7 * 9 + 25 + 33 - 4


def test_confusion_refuses_unknown_class_ids():
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        confusion_matrix(np.array([0, 7]), np.array([0, 1]), 5)


def test_nme_failure_rate_and_auc_equal_direct_computation():
    rng = np.random.default_rng(1)
    true = rng.uniform(0, 100, size=(40, 5, 2))
    predicted = true + rng.normal(0, 4, size=true.shape)
    norms = rng.uniform(30, 60, size=40)
    scores = landmark_scores(predicted, true, norms, thresholds=(0.08, 0.1))

    per_face = np.array([
        np.mean([np.hypot(*(predicted[i, k] - true[i, k])) for k in range(5)]) / norms[i] for i in range(40)
    ])  # fmt: skip
    np.testing.assert_allclose(nme_per_face(predicted, true, norms), per_face)
    assert scores["summary"]["nme"] == pytest.approx(per_face.mean())
    for t in (0.08, 0.1):
        assert scores["summary"][f"fr_{t:g}"] == pytest.approx(np.mean(per_face > t))
        # FaRL's (HRNet's) way: the cumulative error curve sampled every 1e-5, integrated, over t
        xs = np.arange(0, t + 1e-5, 1e-5)
        ced = (per_face[None, :] <= xs[:, None]).mean(axis=1)
        assert scores["summary"][f"auc_{t:g}"] == pytest.approx(np.trapezoid(ced, xs) / t, abs=1e-3)
    point = np.mean(np.linalg.norm(predicted[:, 2] - true[:, 2], axis=-1) / norms)
    assert scores["per_label"]["p2"]["nme"] == pytest.approx(point)
    assert 0 < scores["summary"]["fr_0.08"] < 1  # the thresholds above cut through the errors


def test_leaderboards_show_the_dense_headlines_lower_errors_best():
    from flip.evaluation.leaderboard import headline_metrics
    from flip.evaluation.multitask import higher_is_better

    parsing = {"task": "parsing", "summary": {"mean_f1": 0.8, "miou": 0.7, "pixel_accuracy": 0.9}}
    landmarks = {"task": "landmarks", "summary": {"nme": 0.05, "fr_0.1": 0.02, "auc_0.1": 0.6}}
    assert headline_metrics(parsing) == {"mean_f1": 0.8, "miou": 0.7}
    assert headline_metrics(landmarks) == landmarks["summary"]
    assert [higher_is_better(f"wflw/landmark_probe/{m}") for m in ("nme", "fr_0.1", "auc_0.1")] == [
        False,
        False,
        True,
    ]
    assert higher_is_better("lapa/parsing_probe/mean_f1") and not higher_is_better("age_mae")
