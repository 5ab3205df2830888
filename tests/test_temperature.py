"""The model owns its temperature: the model config starts it (model.init_logit_scale /
init_logit_bias; loss=siglip sets SigLIP's), a checkpoint rebuilds the model from its model config
alone, checkpoints saved while the init was a loss setting still load, and the old keys fail with
the new names."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import flip
from flip.cli.train import train as train_cli
from flip.export import export
from flip.models import build_model
from flip.training.module import FlipLitModule
from flip.training.run import train

from .helpers import TINY_ARCH

CLIP_SCALE, SIGLIP_SCALE = math.log(1 / 0.07), math.log(10)
TINY = {"name": "flip-test-tiny", "arch": TINY_ARCH, "pretrained": None}


def _module(cfg) -> FlipLitModule:
    return FlipLitModule(cfg.model, cfg.loss, cfg.optim)


@pytest.mark.parametrize(
    ("overrides", "scale", "bias"),
    [
        ((), CLIP_SCALE, None),  # the demo: loss=clip_filip
        (("loss=clip",), CLIP_SCALE, None),
        (("loss=filip",), CLIP_SCALE, None),
        (("loss=siglip",), SIGLIP_SCALE, -10.0),
        (("loss=siglip", "model.init_logit_bias=-5", "model.init_logit_scale=1.5"), 1.5, -5.0),
        (("model.init_logit_bias=-3",), CLIP_SCALE, -3.0),  # a CLIP loss with a learnable bias
    ],
)
def test_the_model_config_starts_the_temperature_and_the_loss_config_only_has_terms(
    train_config, overrides, scale, bias
):
    cfg = train_config(*overrides)
    assert set(cfg.loss) == {"terms"}
    assert cfg.model.init_logit_scale == pytest.approx(scale) and cfg.model.init_logit_bias == bias
    module = _module(cfg)
    assert module.model.logit_scale.item() == pytest.approx(scale)
    if bias is None:
        assert module.model.logit_bias is None and "clip.logit_bias" not in module.model.state_dict()
    else:
        assert module.model.logit_bias.item() == pytest.approx(bias)
    saved = module.hparams
    assert saved["model"]["init_logit_scale"] == pytest.approx(scale)
    assert saved["model"]["init_logit_bias"] == bias and set(saved["loss"]) == {"terms"}


def _save(path, hparams: dict, model) -> None:
    """A checkpoint in the form train.py writes: hyperparameters + `model.`-prefixed weights."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)


def _trained(model):
    """The model with every weight moved off its initial value, as training leaves it."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    return model


def _assert_same(loaded, model) -> None:
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_a_checkpoint_rebuilds_its_model_from_the_model_config_alone(train_config, tmp_path, loss):
    cfg = train_config(f"loss={loss}")
    module = _module(cfg)
    _trained(module.model)
    hparams = dict(module.hparams)
    del hparams["loss"]  # nothing of the loss is needed to rebuild the model
    _save(tmp_path / "new.ckpt", hparams, module.model)
    loaded = flip.load(tmp_path / "new.ckpt")
    _assert_same(loaded, module.model)
    assert loaded.config["init_logit_bias"] == cfg.model.init_logit_bias


OLD_LOSSES = {  # hparams["loss"] as checkpoints held it, with the temperature init in it
    "clip": {"init_logit_scale": CLIP_SCALE, "init_logit_bias": None, "terms": {}},
    "siglip": {"init_logit_scale": SIGLIP_SCALE, "init_logit_bias": -10.0, "terms": {}},
}


@pytest.mark.parametrize("loss", sorted(OLD_LOSSES))
def test_a_checkpoint_saved_when_the_loss_held_the_temperature_init_still_loads(tmp_path, loss):
    old = OLD_LOSSES[loss]
    torch.manual_seed(0)
    model = _trained(
        build_model(**TINY, init_logit_scale=old["init_logit_scale"], init_logit_bias=old["init_logit_bias"])
    )
    assert (model.logit_bias is not None) == (loss == "siglip")
    # the old layout: hparams["model"] without init_logit_*, the init under hparams["loss"]
    _save(tmp_path / "old.ckpt", {"model": TINY, "loss": old}, model)

    loaded = flip.load(tmp_path / "old.ckpt")
    _assert_same(loaded, model)  # the bias parameter is rebuilt when the weights have one
    if loss == "siglip":
        assert loaded.logit_bias.item() == pytest.approx(-10.0 + 0.25)
    # its exports rebuild the same model: flip.load of the safetensors folder, and open_clip of its
    # own folder (write_open_clip_folder loads it back and compares every weight)
    export(tmp_path / "old.ckpt", tmp_path / "st", format="safetensors")
    _assert_same(flip.load(tmp_path / "st"), model)
    export(tmp_path / "old.ckpt", tmp_path / "oc", format="open_clip")
    _assert_same(flip.load(tmp_path / "oc"), model)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.init_logit_scale=2.3", r"loss\.init_logit_scale is now model\.init_logit_scale"),
        ("+loss.init_logit_bias=-10", r"loss\.init_logit_bias is now model\.init_logit_bias"),
        ("loss.init_logit_bias=-10,-5", r"loss\.init_logit_bias is now model\.init_logit_bias"),
    ],
)
def test_the_old_loss_keys_on_the_command_line_fail_naming_the_model_keys(monkeypatch, override, message):
    monkeypatch.setattr(sys, "argv", ["train.py", "loss=siglip", override])
    with pytest.raises(SystemExit, match=message):
        train_cli()  # before Hydra composes anything, so before any work


def test_an_old_loss_key_in_a_composed_config_fails_naming_the_model_key(train_config):
    cfg = train_config("+loss.init_logit_scale=2.3")  # what Hydra's compose API lets through
    with pytest.raises(ValueError, match=r"loss\.init_logit_scale is now model\.init_logit_scale"):
        train(cfg)
