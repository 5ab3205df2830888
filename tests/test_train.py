"""Integration: the real Hydra config, composed as train.py composes it, trained for a few steps."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

import flip
from flip.evaluation.benchmark import Benchmark
from flip.evaluation.run import evaluate
from flip.evaluation.zeroshot import ZeroShot
from flip.training.run import train

from .helpers import TINY_OVERRIDES, run_train_py


def _steps_logged(run: Path) -> list[int]:
    """Training steps with a logged loss, over every CSV version a run folder holds."""
    steps = []
    for path in sorted((run / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            steps += [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    return steps


@pytest.mark.slow
def test_train_save_reload_gives_the_same_model(trained_demo):
    cfg, results, run = trained_demo.cfg, trained_demo.results, trained_demo.run
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert _steps_logged(run) == [0, 1, 2, 3]
    assert torch.isfinite(torch.tensor(results["train"]["train/loss"]))

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["protocol"] == "zeroshot" and metrics["n_test"] == 64
    assert set(metrics["per_label"]) == set(cfg.eval.benchmark.binary)  # every attribute reported
    for m in metrics["per_label"].values():
        assert 0 <= m["balanced_accuracy"] <= 1 and m["support"] == 64
    assert set(metrics["multiclass"]) == {"hair_color", "expression"}
    assert (run / "eval" / "report.md").read_text().count("|") > 20

    # the reloaded model answers every question exactly as the trained one did, on the test
    # shards read as labelled shards (eval.test_shards)
    model = flip.load(ckpt)
    urls = sorted(str(p) for p in (trained_demo.faceshapes / "test").glob("*.tar"))
    benchmark = Benchmark.from_config(cfg.eval.benchmark, shards={"test": urls})
    again = evaluate(model, benchmark, {"zeroshot": ZeroShot()}, batch_size=32)["zeroshot"]
    assert again["per_label"] == metrics["per_label"]
    assert again["retrieval"] == pytest.approx(metrics["retrieval"])


@pytest.mark.slow
def test_resume_continues_at_the_saved_step(train_config, tmp_path):
    train(train_config("evaluate=false"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 4
    train(train_config("evaluate=false", f"ckpt_path={ckpt}", "trainer.max_steps=6"))
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["global_step"] == 6
    assert _steps_logged(tmp_path / "run") == [0, 1, 2, 3, 4, 5]  # 4 and 5 only after the resume


@pytest.mark.parametrize(
    ("loss", "terms"),
    [("siglip", {"siglip"}), ("filip", {"filip"}), ("clip_filip", {"clip", "filip"}), ("itc_queue", {"itc"})],
)
@pytest.mark.slow
def test_every_loss_config_trains_through_train_py(train_config, tmp_path, loss, terms):
    results = train(train_config(f"loss={loss}", "evaluate=false", "trainer.max_steps=3", "micro_batches=2"))
    logged = {k.split("/")[1] for k in results["train"] if k.startswith("train/") and "logit" not in k}
    assert logged == terms | {"loss"}
    assert all(torch.isfinite(torch.tensor(v)) for v in results["train"].values())
    assert _steps_logged(tmp_path / "run") == [0, 1, 2]


def test_unknown_group_option_lists_the_available_ones(train_config):
    with pytest.raises(
        (MissingConfigException, ConfigCompositionException), match=r"(?s)model.*tiny.*vit_b16"
    ):
        train_config("model=vit_q99")


def test_bad_values_fail_before_training_and_name_what_is_accepted(train_config, tmp_path):
    with pytest.raises(ValueError, match=r"unknown model.name 'ViT-Q-99'.*RN50"):
        train(train_config("model.name=ViT-Q-99", "model.arch=null"))
    with pytest.raises(FileNotFoundError, match="ckpt_path="):
        train(train_config(f"ckpt_path={tmp_path}/missing.ckpt"))
    with pytest.raises(ValueError, match=r"optim.lr=-1.0 must be > 0"):
        train(train_config("optim.lr=-1.0"))


@pytest.mark.slow
def test_wandb_logger_runs_offline_beside_csv(train_config, tmp_path):
    cfg = train_config("logger=wandb", "evaluate=false", "trainer.max_steps=2")
    assert cfg.logger.wandb.offline is True
    env_mode = os.environ.pop("WANDB_MODE")  # the config alone must keep wandb off the network
    try:
        train(cfg)
    finally:
        os.environ["WANDB_MODE"] = env_mode
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert _steps_logged(tmp_path / "run") == [0, 1]


@pytest.mark.slow
def test_train_py_command_line_end_to_end(tmp_path):
    """`python train.py ...` exactly as a user types it, in a subprocess."""
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("~")] + [
        "hydra.run.dir=" + str(tmp_path / "run")
    ]
    done = run_train_py(*overrides, flip_root=tmp_path)
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["summary"]["mean_balanced_accuracy"] >= 0.0 and len(metrics["per_label"]) == 11
    assert (tmp_path / "data" / "faceshapes" / "manifest.json").is_file()
    assert "mean" in done.stdout
