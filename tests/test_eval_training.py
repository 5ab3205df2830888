"""Evaluation inside training: the zero-shot callback and the end-of-run zero-shot + linear probe."""

from __future__ import annotations

import csv
import json
from functools import partial
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate

from flip.benchmarks import read_folder
from flip.evaluation.features import split_features
from flip.evaluation.run import evaluate_config
from flip.evaluation.zeroshot import evaluate_zeroshot
from flip.training.callbacks import ZeroShotBenchmark
from flip.training.run import train

from .helpers import COLOURS, write_square


class _RecordingLogger:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((step, metrics))


def test_callback_logs_the_benchmark_summary_every_n_steps(tmp_path, tiny_model):
    for name, colour in COLOURS.items():
        for i in range(3):
            write_square(tmp_path / "test" / name / f"{i}.png", colour, seed=i)
    benchmark = {
        "name": "folder",
        "reader": partial(read_folder, tmp_path),
        "test_split": "test",
        "classes": None,
    }
    callback = ZeroShotBenchmark(benchmark, every_n_steps=2, max_samples=None)
    logger = _RecordingLogger()
    module = SimpleNamespace(model=tiny_model.train())
    for step in (0, 1, 2, 3, 4):
        trainer = SimpleNamespace(global_step=step, is_global_zero=True, loggers=[logger])
        callback.on_train_batch_end(trainer, module, None, None, 0)
    assert [step for step, _ in logger.logged] == [2, 4]
    assert set(logger.logged[0][1]) == {"zeroshot/accuracy", "zeroshot/mean_per_class_recall"}
    assert tiny_model.training  # left as it was found
    expected = evaluate_zeroshot(
        tiny_model.eval(), split_features(tiny_model, read_folder(tmp_path, "test")), {}
    )
    assert logger.logged[0][1]["zeroshot/accuracy"] == pytest.approx(expected["summary"]["accuracy"])
    other_rank = SimpleNamespace(global_step=6, is_global_zero=False, loggers=[logger])
    callback.on_train_batch_end(other_rank, module, None, None, 0)
    assert len(logger.logged) == 2
    with pytest.raises(ValueError, match="every_n_steps=0"):
        ZeroShotBenchmark(benchmark, every_n_steps=0)


@pytest.mark.slow
def test_training_logs_zero_shot_results_during_the_run(train_config, tmp_path):
    train(
        train_config(
            "eval.during_training.every_n_steps=2", "eval.during_training.max_samples=16", "evaluate=false"
        )
    )
    with open(next((tmp_path / "run" / "csv").glob("version_*/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("zeroshot/mean_balanced_accuracy")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(0 <= float(r["zeroshot/mean_balanced_accuracy"]) <= 1 for r in rows)
    assert all(0 <= float(r["zeroshot/binding_accuracy"]) <= 1 for r in rows)  # FaceShapes has captions


@pytest.mark.slow
def test_end_of_run_evaluation_writes_zero_shot_and_linear_probe(train_config, tmp_path, tiny_model):
    cfg = train_config(
        "eval.protocols.linear_probe.max_train=60", "eval.protocols.linear_probe.l2_grid=[1.0,0.001]"
    )
    datamodule = instantiate(cfg.data)
    datamodule.ensure()
    results = evaluate_config(tiny_model, cfg.eval, tmp_path / "eval", checkpoint="x.ckpt")
    zeroshot = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    probe = json.loads((tmp_path / "eval" / "linear_probe" / "metrics.json").read_text())
    assert zeroshot == json.loads(json.dumps(results["zeroshot"]))
    assert zeroshot["protocol"] == "zeroshot" and zeroshot["n_test"] == 64 and "retrieval" in zeroshot
    assert probe["protocol"] == "linear_probe" and probe["task"] == "attributes" and probe["split"] == "test"
    assert probe["labels"] == zeroshot["labels"] and len(probe["labels"]) == 11
    assert probe["n_train"] == 60 and probe["n_test"] == 64 and probe["val_split"] == "val"
    assert [b["n_train"] for b in probe["fractions"].values()] == [2, 6, 60]
    assert zeroshot["skipped"] == {"test": {}} and probe["skipped"] == {"train": {}, "val": {}, "test": {}}
    assert probe["l2"] in (1.0, 0.001) and 0 <= probe["summary"]["mean_balanced_accuracy"] <= 1
    # FaceShapes' multi-class questions are probed too, scored as zero-shot scores them
    assert set(probe["multiclass"]) == set(zeroshot["multiclass"]) == {"hair_color", "expression"}
    assert {"expression_accuracy", "hair_color_mean_per_class_recall"} <= set(probe["summary"])
    for name in (
        "per_label.png",
        "confusion_hair_color.png",
        "linear_probe/per_label.png",
        "linear_probe/confusion_expression.png",
    ):
        assert (tmp_path / "eval" / name).stat().st_size > 1000
