"""The binding metric (flip.evaluation.binding) against a direct computation, and a short
training with data.hard_negatives on FaceShapes that logs the foil fraction and reports binding."""

from __future__ import annotations

import csv
import json
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Callback

from flip.benchmarks.base import EncodedImages, LabelledSplit
from flip.data.foils import FoilMaker
from flip.evaluation.binding import binding_metrics, split_record
from flip.training.run import train

from .helpers import compose_train_config

CAPTIONS = [
    "a person with a mustache and a hat",
    "a person without a hat",
    "a smiling person with a mustache",
    "a photo of a face",  # nothing to foil
]


@pytest.fixture
def split() -> LabelledSplit:
    return LabelledSplit(
        benchmark="toy", split="test", task="attributes", label_names=["mustache"],
        targets=np.array([[1], [0], [1], [-1]], dtype=np.int8), keys=list("abcd"),
        images=EncodedImages((b"",) * 4, tuple("abcd")), captions=CAPTIONS,
    )  # fmt: skip


def test_binding_equals_a_direct_computation(tiny_model, split, tmp_path):
    table = tmp_path / "table.yaml"
    table.write_text(
        yaml.safe_dump(
            {
                "mustache": {"with a mustache": ["without a mustache"]},
                "hat": {"a hat": ["a scarf"], "without a hat": ["with a hat"]},
                "expression": {"smiling": ["frowning"]},
            }
        )
    )
    foils = {  # (image, changed attribute, foil): the table allows exactly one per attribute
        (0, "mustache", "a person without a mustache and a hat"),
        (0, "hat", "a person with a mustache and a scarf"),
        (1, "hat", "a person with a hat"),
        (2, "mustache", "a smiling person without a mustache"),
        (2, "expression", "a frowning person with a mustache"),
    }
    torch.manual_seed(0)
    images = torch.randn(4, tiny_model.encode_text(tiny_model.tokenize(["x"])).shape[-1])
    got = binding_metrics(tiny_model, split, images, FoilMaker(source="table", table=str(table)))

    with torch.no_grad():

        def score(i: int, text: str) -> float:
            feature = F.normalize(tiny_model.encode_text(tiny_model.tokenize([text])).float(), dim=-1)[0]
            return float(F.normalize(images[i], dim=-1) @ feature)

        hits = {}
        for i, attribute, foil in foils:
            hits.setdefault(attribute, []).append(score(i, CAPTIONS[i]) > score(i, foil))
    assert got["n_foils"] == 5 and got["n_images"] == 3
    assert got["per_attribute"] == {
        a: {"accuracy": pytest.approx(np.mean(h)), "n": len(h)} for a, h in hits.items()
    }
    assert got["accuracy"] == pytest.approx(np.mean([x for h in hits.values() for x in h]))
    assert got["mean_per_attribute"] == pytest.approx(np.mean([np.mean(h) for h in hits.values()]))
    # deterministic: the same foils, the same numbers
    assert binding_metrics(tiny_model, split, images, FoilMaker(source="table", table=str(table))) == got


def test_a_split_without_captions_has_no_binding_and_labels_become_a_record(tiny_model, split):
    assert (
        binding_metrics(tiny_model, LabelledSplit(**{**split.__dict__, "captions": None}), torch.zeros(4, 8))
        is None
    )
    assert split_record(split, 0) == {"mustache": True} and split_record(split, 3) == {"mustache": None}
    nothing = LabelledSplit(**{**split.__dict__, "captions": ["a photo"] * 4})
    assert binding_metrics(tiny_model, nothing, torch.zeros(4, 8))["n_foils"] == 0


class RecordTermSteps(Callback):
    """Each training step's (trainer step, the step every loss term was told) pair."""

    seen: ClassVar[list[tuple[int, list[int]]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        terms = pl_module.criterion.terms.values()
        RecordTermSteps.seen.append((trainer.global_step - 1, [term.step for term in terms]))


@pytest.mark.slow
def test_training_with_hard_negatives_logs_the_foil_fraction_and_reports_binding(tmp_path):
    RecordTermSteps.seen = []
    cfg = compose_train_config(
        tmp_path,
        [
            "loss=clip_filip", "data.hard_negatives={source:auto,per_caption:2}", "trainer.max_steps=3",
            "loss.terms.filip.loss.foil_choice_weight=1.0", "loss.terms.filip.loss.foil_choice_start_step=1",
            "+callbacks.steps={_target_: tests.test_binding.RecordTermSteps}",
        ],
    )  # fmt: skip
    train(cfg)
    # the foil choice schedule reads the trainer's step: every term (clip and filip) was told it
    assert RecordTermSteps.seen == [(0, [0, 0]), (1, [1, 1]), (2, [2, 2])]
    run = tmp_path / "run"
    rows = []
    for path in sorted((run / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    fractions = [float(r["train/foil_fraction"]) for r in rows if r.get("train/foil_fraction")]
    assert len(fractions) == 3 and min(fractions) >= 0.9  # nearly every FaceShapes caption gets foils
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    binding = metrics["binding"]
    attributes = set(cfg.eval.benchmark.binary) | {"hair_color", "expression"}
    assert set(binding["per_attribute"]) <= attributes and len(binding["per_attribute"]) >= 8
    assert binding["n_images"] >= 60 and binding["n_foils"] == sum(
        m["n"] for m in binding["per_attribute"].values()
    )
    assert 0 <= binding["accuracy"] <= 1
    assert "binding (each caption against itself" in (run / "eval" / "report.md").read_text()
