"""Import: open_clip folders and checkpoint files initialise FLIP models and training, losslessly."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import flip
from flip.export import export
from flip.models import build_model
from flip.training.module import FlipLitModule
from flip.training.run import train

from .helpers import TINY_ARCH

# a SigLIP-style model (it has a logit_bias) with an image transform unlike open_clip's default
MODEL_CFG = {**TINY_ARCH, "init_logit_bias": -10.0}
PREPROCESS_CFG = {
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "interpolation": "bilinear",
    "resize_mode": "squash",
}


def write_open_clip_folder(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """What an open_clip user has: open_clip_config.json + open_clip_model.safetensors, made without FLIP."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**MODEL_CFG)
    with torch.no_grad():
        for parameter in model.parameters():  # not open_clip's init values: nothing can match by accident
            parameter.add_(torch.randn_like(parameter) * 0.01)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG})
    )
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return state


def assert_same_state(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def test_round_trip_open_clip_to_flip_to_open_clip_is_lossless(tmp_path):
    original = write_open_clip_folder(tmp_path / "from_open_clip")
    model = flip.load(tmp_path / "from_open_clip")
    assert_same_state(model.clip.state_dict(), original)
    _, _, reference_preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{tmp_path / 'from_open_clip'}"
    )
    assert str(model.preprocess) == str(reference_preprocess)  # squash resize, bilinear, mean 0.5 kept

    export(model, tmp_path / "back", "open_clip")
    assert_same_state(load_file(str(tmp_path / "back" / "open_clip_model.safetensors")), original)
    config = json.loads((tmp_path / "back" / "open_clip_config.json").read_text())
    assert config["model_cfg"] == MODEL_CFG
    assert {key: config["preprocess_cfg"][key] for key in PREPROCESS_CFG} == PREPROCESS_CFG
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'back'}")
    assert str(preprocess) == str(reference_preprocess)


@pytest.mark.parametrize("form", ["safetensors", "open_clip_train_pt"])
def test_model_pretrained_takes_an_open_clip_checkpoint_file(train_config, tmp_path, form):
    original = write_open_clip_folder(tmp_path / "oc")
    if form == "safetensors":
        path = tmp_path / "oc" / "open_clip_model.safetensors"
    else:  # what open_clip's own trainer writes: epoch_N.pt with a DDP-prefixed state_dict
        path = tmp_path / "epoch_3.pt"
        state = {f"module.{key}": value for key, value in original.items()}
        torch.save({"epoch": 3, "name": "run", "state_dict": state}, path)
    cfg = train_config(f"model.pretrained={path}", "+model.arch.init_logit_bias=-10.0", "loss=siglip")
    module = FlipLitModule(cfg.model, cfg.loss, cfg.optim)
    assert_same_state(module.model.clip.state_dict(), original)


@pytest.mark.slow
def test_training_starts_from_an_open_clip_local_dir_folder(train_config, tmp_path):
    original = write_open_clip_folder(tmp_path / "oc")
    cfg = train_config(
        f"model.name=local-dir:{tmp_path / 'oc'}", "model.arch=null", "loss=siglip", "evaluate=false"
    )
    module = FlipLitModule(cfg.model, cfg.loss, cfg.optim)
    assert_same_state(module.model.clip.state_dict(), original)

    train(cfg)
    trained = flip.load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    changed = [
        key for key, value in trained.clip.state_dict().items() if not torch.equal(value, original[key])
    ]
    assert "visual.conv1.weight" in changed  # it trained from there
    export(trained, tmp_path / "exported", "open_clip")
    config = json.loads((tmp_path / "exported" / "open_clip_config.json").read_text())
    assert {
        key: value for key, value in config["model_cfg"].items() if key != "init_logit_scale"
    } == MODEL_CFG


def test_a_relative_local_dir_is_recorded_as_an_absolute_path(tmp_path, monkeypatch):
    write_open_clip_folder(tmp_path / "oc")
    monkeypatch.chdir(tmp_path)
    assert build_model("local-dir:oc").config["name"] == f"local-dir:{tmp_path / 'oc'}"


def test_a_run_from_a_relative_local_dir_reloads_from_another_directory(tmp_path, monkeypatch, train_config):
    write_open_clip_folder(tmp_path / "oc")
    cfg = train_config("model.name=local-dir:oc", "model.arch=null", "loss=siglip")
    monkeypatch.chdir(tmp_path)
    module = FlipLitModule(cfg.model, cfg.loss, cfg.optim)
    assert module.hparams.model["name"] == f"local-dir:{tmp_path / 'oc'}"
    monkeypatch.chdir(tmp_path.parent)
    rebuilt = FlipLitModule(module.hparams.model, cfg.loss, cfg.optim)
    rebuilt_state = rebuilt.model.state_dict()
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, rebuilt_state[name]), name


def test_pretrained_cannot_be_combined_with_a_local_dir_name(tmp_path):
    write_open_clip_folder(tmp_path / "oc")
    with pytest.raises(
        ValueError, match=r"model.pretrained='x.pt' with model.name='local-dir:.*pretrained=null"
    ):
        build_model(f"local-dir:{tmp_path / 'oc'}", pretrained="x.pt")
