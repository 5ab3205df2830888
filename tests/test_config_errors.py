"""Configs and resumes that would fail late or silently: numbers of the wrong type are named before
anything is built, a resume with other optimizer settings says which keep applying, and loading a
trained checkpoint does not claim the model was initialised randomly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import flip
from flip.training.run import train

from .helpers import SHARDS_BASE, compose_train_config, save_checkpoint, write_caption_shards

RANDOM_INIT = "No pretrained weights loaded"


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    return Path(write_caption_shards(tmp_path / "shards", count=40, per_shard=10)[0]).parent


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_steps=abc", r"trainer\.max_steps='abc' \(str\) must be an integer"),
        ("trainer.max_steps=2.5", r"trainer\.max_steps=2\.5 \(float\) must be an integer"),
        ("data.batch_size=true", r"data\.batch_size=True \(bool\) must be an integer"),
        ("optim.lr=fast", r"optim\.lr='fast' \(str\) must be a number"),
        (
            "trainer.val_check_interval=often",
            r"trainer\.val_check_interval='often' \(str\) must be a number or null",
        ),
    ],
)
def test_a_number_of_the_wrong_type_is_named_before_anything_runs(tmp_path, shard_dir, override, expected):
    cfg = compose_train_config(tmp_path, [f"data.train_shards={shard_dir}", override], SHARDS_BASE)
    with pytest.raises(ValueError, match=expected):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before building anything


@pytest.mark.slow
def test_resuming_with_another_learning_rate_names_both_and_keeps_the_checkpoints(
    tmp_path, shard_dir, caplog
):
    base = [
        f"data.train_shards={shard_dir}",
        "data.batch_size=8",
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    train(compose_train_config(tmp_path, [*base, "trainer.max_steps=2"], SHARDS_BASE))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    caplog.clear()
    resume = [*base, "trainer.max_steps=3", "optim.lr=5e-4", f"ckpt_path={last}"]
    with caplog.at_level(logging.WARNING):
        train(compose_train_config(tmp_path, resume, SHARDS_BASE))
    warnings = [r.getMessage() for r in caplog.records if "optimizer settings that differ" in r.getMessage()]
    assert len(warnings) == 1 and "optim.lr: 0.001 in the checkpoint, 0.0005 now" in warnings[0]
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3
    assert saved["lr_schedulers"][0]["base_lrs"][0] == pytest.approx(1e-3)  # the checkpoint's rate kept


def test_loading_a_trained_checkpoint_does_not_say_initialized_randomly(tmp_path, tiny_model, caplog):
    ckpt = save_checkpoint(tiny_model, tmp_path / "tiny.ckpt")
    with caplog.at_level(logging.INFO):
        from flip.models import build_model

        build_model("flip-test-tiny", None)  # a model without weights: open_clip says so, rightly
        assert any(RANDOM_INIT in r.getMessage() for r in caplog.records)
        caplog.clear()
        model = flip.load(ckpt)
    assert not [r.getMessage() for r in caplog.records if RANDOM_INIT in r.getMessage()]
    assert torch.equal(model.logit_scale, tiny_model.logit_scale)
    assert not [f for f in logging.getLogger().filters if "RandomInit" in type(f).__name__]  # removed after


def test_a_missing_ckpt_path_names_the_auto_option(tmp_path, shard_dir):
    missing = tmp_path / "nope.ckpt"
    cfg = compose_train_config(
        tmp_path, [f"data.train_shards={shard_dir}", f"ckpt_path={missing}"], SHARDS_BASE
    )
    with pytest.raises(FileNotFoundError, match=r"does not exist.*ckpt_path=auto"):
        train(cfg)
