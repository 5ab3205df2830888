import dataclasses
import io
import json

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from flip.benchmarks import read_labelled_shards
from flip.evaluation import features as features_module
from flip.evaluation.benchmark import Benchmark
from flip.evaluation.run import evaluate
from flip.evaluation.zeroshot import ZeroShot, ZeroShotClassifier, ensemble_embedding, expand


def test_expand_fills_every_template_with_every_phrase():
    assert expand(["a {}.", "the {}"], ["x", "y"]) == ["a x.", "a y.", "the x", "the y"]
    with pytest.raises(ValueError, match="placeholder"):
        expand(["no slot"], ["x"])


def test_ensemble_embedding_is_the_renormalised_mean_of_prompt_embeddings(tiny_model):
    prompts = ["a person with a hat", "a person wearing a hat"]
    with torch.no_grad():
        each = tiny_model.encode_text(tiny_model.tokenize(prompts), normalize=True)
    expected = F.normalize(each.mean(0), dim=-1)
    torch.testing.assert_close(ensemble_embedding(tiny_model, prompts), expected)


def _planted_classifier() -> ZeroShotClassifier:
    """Axis-aligned class embeddings, so the right answer is known for any image feature."""
    eye = torch.eye(6)
    return ZeroShotClassifier(
        binary_names=["hat", "beard"],
        binary_embeddings=torch.stack([eye[[0, 1]], eye[[2, 3]]]),
        multiclass={"mood": (["happy", "sad"], eye[[4, 5]])},
        logit_scale=100.0,
    )


def test_binary_decision_is_the_softmax_over_the_positive_and_negative_pair():
    clf = _planted_classifier()
    features = torch.tensor([[1.0, 0, 0, 1, 1, 0], [0, 1.0, 1, 0, 0, 1]])
    probs = clf.predict(features)
    assert probs["binary"].shape == (2, 2)
    f = F.normalize(features, dim=-1)
    expected_hat = torch.softmax(100 * torch.stack([f[:, 0], f[:, 1]], dim=1), dim=1)[:, 0]
    torch.testing.assert_close(probs["binary"][:, 0], expected_hat)
    assert probs["binary"][0, 0] > 0.99 and probs["binary"][0, 1] < 0.01
    assert probs["mood"].argmax(1).tolist() == [0, 1]


def _labelled_shard(path, metadata: list[dict]) -> str:
    """A shard whose samples carry these `.json` labels (the images do not matter: features are planted)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    with wds.TarWriter(str(path)) as sink:
        for i, meta in enumerate(metadata):
            sink.write({"__key__": f"{i:03d}", "png": buffer.getvalue(), "json": json.dumps(meta).encode()})
    return str(path)


def test_zero_shot_reports_every_attribute_and_skips_unlabelled_classes(tmp_path, tiny_model, monkeypatch):
    """Labelled shards through flip.evaluation.evaluate, the planted classifier deciding."""
    url = _labelled_shard(
        tmp_path / "labelled.tar",
        [
            {"hat": True, "beard": False, "mood": "happy"},
            {"hat": False, "beard": True, "mood": None},  # no label: left out of the mood metrics
            {"hat": False, "beard": True, "mood": "sad"},
            {"hat": True, "beard": False, "mood": "angry"},  # outside the classes: the sample is left out
        ],
    )
    features = torch.tensor([[1.0, 0, 0, 1, 1, 0], [0, 1.0, 1, 0, 0, 1], [1.0, 0, 1, 0, 0, 1]])
    monkeypatch.setattr(features_module, "extract_image_features", lambda *a, **k: (features, [0, 1, 2]))
    monkeypatch.setattr(
        ZeroShotClassifier, "from_prompts", classmethod(lambda cls, *a: _planted_classifier())
    )

    def reader(split: str):  # without the (empty) captions: no retrieval on planted features
        labelled = read_labelled_shards([url], split, ["hat", "beard"], {"mood": ["happy", "sad"]}, "planted")
        return dataclasses.replace(labelled, captions=None)

    benchmark = Benchmark("planted", reader, {"multiclass": {"mood": {"happy": ["happy"], "sad": ["sad"]}}})
    scores = evaluate(tiny_model, benchmark, {"zeroshot": ZeroShot()})["zeroshot"]
    assert scores["labels"] == ["hat", "beard"] and scores["n_test"] == 3
    assert scores["per_label"]["hat"]["accuracy"] == pytest.approx(2 / 3)
    assert scores["per_label"]["beard"]["accuracy"] == pytest.approx(1.0)
    assert scores["summary"]["mean_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["multiclass"]["mood"]["support"] == 2
    assert scores["multiclass"]["mood"]["accuracy"] == pytest.approx(1.0)
    assert scores["skipped"] == {"test": {"unusable_record": 1}}
