"""WiSE-FT (flip-export --interpolate): alpha 1 and 0 give the two models exactly, 0.5 their mean, and
two models of different architectures fail naming the tensors that differ."""

from __future__ import annotations

import copy

import pytest
import torch

import flip
from flip.cli.export import main
from flip.export.interpolate import interpolate, interpolate_state_dicts

from .helpers import save_checkpoint


@pytest.fixture
def two_models(tiny_model):
    """The tiny model as the zero-shot start, and a copy with every weight moved as the fine-tuned one."""
    tuned = copy.deepcopy(tiny_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(torch.randn(param.shape, generator=generator))
    return tuned, tiny_model


def test_alpha_one_and_zero_give_the_models_and_one_half_their_mean(two_models):
    tuned, start = (m.state_dict() for m in two_models)
    assert all(torch.equal(v, tuned[k]) for k, v in interpolate_state_dicts(tuned, start, 1.0).items())
    assert all(torch.equal(v, start[k]) for k, v in interpolate_state_dicts(tuned, start, 0.0).items())
    mean = interpolate_state_dicts(tuned, start, 0.5)
    assert mean.keys() == tuned.keys()
    for key, value in mean.items():
        torch.testing.assert_close(value, (tuned[key] + start[key]) / 2, rtol=0, atol=1e-6)
    model = interpolate(*two_models, 0.25)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, 0.25 * tuned[key] + 0.75 * start[key], rtol=0, atol=1e-6)


def test_models_of_different_architectures_fail_naming_the_tensors(two_models):
    tuned, start = (dict(m.state_dict()) for m in two_models)
    missing = dict(start)
    del missing["clip.visual.proj"]
    with pytest.raises(ValueError, match=r"only in the fine-tuned one: \['clip.visual.proj'\]"):
        interpolate_state_dicts(tuned, missing, 0.5)
    reshaped = {**start, "clip.visual.ln_post.weight": torch.ones(7)}
    with pytest.raises(ValueError, match=r"clip.visual.ln_post.weight \(32,\) vs \(7,\)"):
        interpolate_state_dicts(tuned, reshaped, 0.5)
    counted = {**start, "steps": torch.tensor(3)}
    with pytest.raises(ValueError, match=r"steps is not floating point and differs"):
        interpolate_state_dicts({**tuned, "steps": torch.tensor(4)}, counted, 0.5)
    with pytest.raises(ValueError, match=r"alpha=1.5 must be in \[0, 1\]"):
        interpolate_state_dicts(tuned, start, 1.5)


def test_flip_export_interpolate_writes_the_mix_flip_load_reads(two_models, tmp_path, capsys):
    tuned = save_checkpoint(two_models[0], tmp_path / "tuned.ckpt")
    start = save_checkpoint(two_models[1], tmp_path / "start.ckpt")
    out = tmp_path / "wise"
    args = [
        "--interpolate",
        str(tuned),
        str(start),
        "--alpha",
        "0.5",
        "--format",
        "safetensors",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    mixed = flip.load(out).state_dict()
    for key, value in two_models[0].state_dict().items():
        torch.testing.assert_close(
            mixed[key], (value + two_models[1].state_dict()[key]) / 2, rtol=0, atol=1e-6
        )
    with pytest.raises(SystemExit) as refused:
        main(
            ["--interpolate", str(tuned), str(start), "--format", "safetensors", "--out", str(tmp_path / "x")]
        )
    assert refused.value.code == 2 and "--interpolate needs --alpha" in capsys.readouterr().err
