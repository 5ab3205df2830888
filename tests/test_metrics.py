import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score

from flip.evaluation.metrics import binary_metrics, multiclass_metrics
from flip.evaluation.retrieval import retrieval_recalls


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_equal_sklearn_on_random_predictions(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.random(500) < 0.2  # imbalanced, as face attributes are
    y_pred = rng.random(500) < 0.4
    m = binary_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["recall_positive"] == pytest.approx(recall_score(y_true, y_pred, pos_label=True))
    assert m["recall_negative"] == pytest.approx(recall_score(y_true, y_pred, pos_label=False))
    assert m["support"] == 500 and m["positives"] == int(y_true.sum())


def test_balanced_accuracy_exposes_a_constant_answer():
    y_true = np.array([True] * 10 + [False] * 90)
    m = binary_metrics(y_true, np.zeros(100, dtype=bool))
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert (m["recall_positive"], m["recall_negative"]) == (0.0, 1.0)


def test_a_class_absent_from_the_labels_has_no_recall_and_stays_out_of_the_mean():
    m = binary_metrics(np.zeros(4, dtype=bool), np.array([True, False, False, False]))
    assert np.isnan(m["recall_positive"]) and m["recall_negative"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    m = multiclass_metrics(y_true, y_pred, ["a", "b", "c", "d", "e"])
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["mean_per_class_recall"] == pytest.approx(recall_score(y_true, y_pred, average="macro"))
    per_class = recall_score(y_true, y_pred, average=None)
    assert [m["per_class"][c]["recall"] for c in "abcde"] == pytest.approx(per_class)


def test_retrieval_recalls_match_a_naive_ranking():
    torch.manual_seed(0)
    image, text = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1), torch.randn(50, 8)
    text[:10] = image[:10]  # some pairs are findable
    text = torch.nn.functional.normalize(text, dim=-1)
    recalls = retrieval_recalls(image, text)
    sim = (image @ text.T).numpy()
    for k in (1, 5, 10):
        i2t = np.mean([i in np.argsort(-sim[i])[:k] for i in range(50)])
        t2i = np.mean([i in np.argsort(-sim[:, i])[:k] for i in range(50)])
        assert recalls[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert recalls[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert recalls["i2t_R@1"] >= 0.2
