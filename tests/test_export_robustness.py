"""flip-export never removes what it did not write, and never leaves a staged export behind."""

from __future__ import annotations

import json
import os

import pytest

import flip
import flip.export
from flip.cli.export import main
from flip.export import export


def _tree(folder) -> dict[str, bytes | None]:
    """Every entry under `folder` (hidden ones too) with its bytes; folders map to None."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def test_out_dot_is_refused_with_a_message_and_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch, capsys):
    for holds_files in (False, True):
        work = tmp_path / f"work{int(holds_files)}"
        work.mkdir()
        if holds_files:
            (work / "mine.txt").write_text("mine")
        monkeypatch.chdir(work)
        before = _tree(tmp_path)
        for out in (".", "..", str(work)):
            args = ["--ckpt", str(tiny_ckpt), "--format", "safetensors", "--out", out]
            assert main([*args, "--overwrite"]) == 2
            assert "current folder" in capsys.readouterr().err
            assert _tree(tmp_path) == before  # no staged export, no half-replaced folder


def test_overwrite_replaces_a_previous_export_and_refuses_any_other_folder_deleting_nothing(
    tiny_ckpt, tiny_model, tmp_path, capsys
):
    out = tmp_path / "model"
    args = ["--ckpt", str(tiny_ckpt), "--out", str(out)]
    assert main([*args, "--format", "safetensors"]) == 0
    assert main([*args, "--format", "open_clip"]) == 2  # without --overwrite: refused
    assert "already holds files" in capsys.readouterr().err
    assert main([*args, "--format", "open_clip", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert main([*args, "--format", "safetensors", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["flip_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["model", "tiny.ckpt"]  # nothing staged or retired is left
    reloaded = flip.load(out)
    assert all(
        (a == b).all()
        for a, b in zip(reloaded.state_dict().values(), tiny_model.state_dict().values(), strict=True)
    )

    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "precious.txt").write_text("years of work")
    (precious / "sub" / "data.bin").write_bytes(b"\x00\x01")
    args = ["--ckpt", str(tiny_ckpt), "--format", "safetensors", "--out", str(precious), "--overwrite"]
    before = _tree(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not a previous export" in err and "precious.txt" in err and "sub/" in err
    assert _tree(tmp_path) == before

    # an export config does not make a folder an export when it holds anything else
    export(tiny_model, tmp_path / "previous", "safetensors")
    (tmp_path / "previous" / "precious.txt").write_text("mine")
    (tmp_path / "previous" / "extra").mkdir()
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match=r"flip_config\.json.*holds extra/, precious\.txt"):
        export(tiny_model, tmp_path / "previous", "onnx", overwrite=True)
    # nor does a config file of the right name that no export wrote
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "flip_config.json").write_text(json.dumps({"mine": True}))
    (fake / "model.safetensors").write_bytes(b"my own weights")
    with pytest.raises(FileExistsError, match=r"flip_config\.json is not the config a safetensors export"):
        export(tiny_model, fake, "safetensors", overwrite=True)
    assert _tree(tmp_path) == before | {"fake": None, **{f"fake/{k}": v for k, v in _tree(fake).items()}}


def test_a_failure_at_any_point_of_an_export_leaves_no_staged_folder_and_the_previous_export_intact(
    tiny_model, tmp_path, monkeypatch
):
    out = tmp_path / "model"
    export(tiny_model, out, "safetensors")
    previous = _tree(tmp_path)

    def writes_then_fails(model, folder):
        flip.export.WRITERS["safetensors"].__wrapped__(model, folder)
        raise RuntimeError("disk full, injected")

    writer = flip.export.WRITERS["safetensors"]
    writes_then_fails.__wrapped__ = writer
    monkeypatch.setitem(flip.export.WRITERS, "safetensors", writes_then_fails)
    with pytest.raises(RuntimeError, match="injected"):
        export(tiny_model, out, "safetensors", overwrite=True)
    assert _tree(tmp_path) == previous
    monkeypatch.setitem(flip.export.WRITERS, "safetensors", writer)

    real_replace = os.replace

    def rename_fails_onto_out(src, dst):
        if os.fspath(src).endswith(".tmp"):  # the staged export moving onto --out
            raise OSError(16, "Device or resource busy, injected", os.fspath(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", rename_fails_onto_out)
    for target in (out, tmp_path / "new"):  # replacing a previous export, and a new folder
        with pytest.raises(OSError, match="injected"):
            export(tiny_model, target, "safetensors", overwrite=True)
        assert _tree(tmp_path) == previous
