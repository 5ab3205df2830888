"""No code runs from a checkpoint, on any path that loads one; unreadable checkpoints are named.

Every test feeds a real payload: a pickle whose `__reduce__` touches a marker file when it is
unpickled, and asserts the marker never appears. The paths: `flip.load` on a `.ckpt`, on a
safetensors export folder and on an open_clip folder (with pickles beside the weights, or as
the weights), `train.py ckpt_path=` (Lightning), `model.pretrained=`, `model.image_init.checkpoint=`,
a Hugging Face text tower's local folder (`text_cfg.hf_model_pretrained`),
`eval/*.py ckpt=`, `flip-query --ckpt` and `--pretrained`, `flip-export --ckpt`, the feature
cache, and the DeepSpeed paths: resume from a ZeRO folder (DeepSpeed's engine reads the shards)
and `flip-zero-to-fp32`.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flip
from flip.atomic import atomic_file, atomic_write_text
from flip.checkpoint import CheckpointError, UnsafeCheckpointError, read_checkpoint
from flip.cli.export import main as flip_export
from flip.cli.query import main as flip_query
from flip.evaluation.features import FeatureCache
from flip.export.open_clip_format import write_open_clip_folder
from flip.export.safetensors_format import write_safetensors_folder
from flip.models import build_model
from flip.training.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from flip.training.deepspeed import consolidate
from flip.training.deepspeed import main as zero_to_fp32
from flip.training.run import train

from .helpers import (
    ROOT,
    SHARDS_BASE,
    TINY_ARCH,
    compose_eval,
    compose_train_config,
    flip_root_env,
    write_caption_shards,
)


class Payload:
    """Unpickling this touches `marker`: what a crafted checkpoint would do with `os.system`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


def evil_file(path: Path, marker: Path, payload_key: str = "state_dict") -> Path:
    """A file torch.save wrote, laid out like a checkpoint, carrying the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {}, payload_key: Payload(marker), "w": torch.ones(2)}, path)
    return path


def assert_refused(err: BaseException, path: Path) -> None:
    """Refused with a message that names the file and never suggests turning the check off."""
    message = str(err)
    assert str(path) in message, message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message, message


def test_the_payload_is_live_when_unpickled_without_the_check(tmp_path, marker):
    torch.load(evil_file(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()  # so a marker that stays absent below means the check held


# ---------------------------------------------------------------- single files


def test_flip_load_refuses_a_crafted_ckpt(tmp_path, marker):
    evil = evil_file(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError) as err:
        flip.load(evil)
    assert_refused(err.value, evil)
    assert not marker.exists()


def test_train_py_ckpt_path_refuses_a_crafted_ckpt(tmp_path, marker):
    shards = Path(write_caption_shards(tmp_path / "shards", count=20, per_shard=10)[0]).parent
    evil = evil_file(tmp_path / "evil.ckpt", marker)
    cfg = compose_train_config(tmp_path, [f"data.train_shards={shards}", f"ckpt_path={evil}"], SHARDS_BASE)
    with pytest.raises(pickle.UnpicklingError) as err:
        train(cfg)
    assert_refused(err.value, evil)
    assert not marker.exists()


def test_lightning_checkpoint_io_cannot_be_asked_to_unpickle(tmp_path, marker):
    evil = evil_file(tmp_path / "evil.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError) as err:
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert_refused(err.value, evil)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_model_pretrained_file_refuses_a_payload(tmp_path, marker, suffix):
    evil = evil_file(tmp_path / f"weights{suffix}", marker)
    with pytest.raises(Exception):  # noqa: B017 (open_clip's own error; the marker is what matters)
        build_model("flip-test-tiny", TINY_ARCH, pretrained=str(evil))
    assert not marker.exists()


def test_a_tower_init_checkpoint_refuses_a_payload(tmp_path, marker):
    from flip.models.pretrained import load_tower

    evil = evil_file(tmp_path / "tower.ckpt", marker)
    model = build_model("flip-test-tiny", TINY_ARCH)
    with pytest.raises(pickle.UnpicklingError):
        load_tower(model, "image", {"checkpoint": str(evil)})
    assert not marker.exists()


def test_a_hugging_face_text_tower_folder_never_runs_a_pickled_weights_file(tmp_path, marker):
    from .helpers.bert import bert_arch, write_tiny_bert

    folder = write_tiny_bert(tmp_path / "bert", with_weights=False)
    evil_file(folder / "pytorch_model.bin", marker)
    with pytest.raises(Exception):  # noqa: B017 (transformers' error; the marker is what matters)
        build_model("flip-test-bert-payload", bert_arch(folder, pretrained=True))
    assert not marker.exists()


def test_eval_entry_point_ckpt_refuses_a_payload(tmp_path, marker):
    from flip.cli.evaluate import load_eval_model

    evil = evil_file(tmp_path / "evil.ckpt", marker)
    cfg = compose_eval(
        "eval_zeroshot", tmp_path, f"ckpt={evil}", "benchmark=folder", f"benchmark.root={tmp_path}"
    )
    with pytest.raises(UnsafeCheckpointError) as err:
        load_eval_model(cfg)
    assert_refused(err.value, evil)
    assert not marker.exists()


def test_flip_query_refuses_a_payload_as_ckpt_and_as_pretrained(tmp_path, marker, tiny_model):
    evil = evil_file(tmp_path / "evil.ckpt", marker)
    image = tmp_path / "face.png"
    from PIL import Image

    Image.new("RGB", (30, 30), (200, 180, 150)).save(image)
    with pytest.raises(UnsafeCheckpointError) as err:
        flip_query(["--ckpt", str(evil), "--attributes", "smiling", "--", str(image)])
    assert_refused(err.value, evil)
    with pytest.raises(Exception):  # noqa: B017 (open_clip's error)
        flip_query(
            [
                "--open-clip",
                "flip-test-tiny",
                "--pretrained",
                str(evil),
                "--attributes",
                "x",
                "--",
                str(image),
            ]
        )
    assert not marker.exists()


def test_flip_export_refuses_a_payload(tmp_path, marker, capsys):
    evil = evil_file(tmp_path / "evil.ckpt", marker)
    assert flip_export(["--ckpt", str(evil), "--format", "safetensors", "--out", str(tmp_path / "out")]) == 2
    assert_refused(capsys.readouterr().err, evil)
    assert not (tmp_path / "out").exists() and not marker.exists()


def test_the_feature_cache_ignores_a_payload(tmp_path, marker):
    cache = FeatureCache(tmp_path / "cache")
    evil_file(cache.path("k" * 32), marker)
    assert cache.load("k" * 32) is None
    assert not marker.exists()


# ---------------------------------------------------------------- exported folders


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pth", "open_clip_pytorch_model.bin", "x.pt"])
def test_a_safetensors_export_never_reads_pickles_beside_its_weights(tmp_path, marker, tiny_model, name):
    folder = tmp_path / "export"
    folder.mkdir()
    write_safetensors_folder(tiny_model, folder)
    evil_file(folder / name, marker)
    loaded = flip.load(folder)
    assert torch.equal(loaded.logit_scale, tiny_model.logit_scale)
    assert not marker.exists()


def test_an_open_clip_folder_prefers_its_safetensors_to_a_pickle_beside_them(tmp_path, marker, tiny_model):
    folder = tmp_path / "export"
    folder.mkdir()
    write_open_clip_folder(tiny_model, folder, verify=False)
    evil_file(folder / "open_clip_pytorch_model.bin", marker)
    evil_file(folder / "pytorch_model.bin", marker)
    flip.load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "weights.pth", "pytorch_model.bin"])
def test_an_open_clip_folder_whose_weights_are_a_payload_is_refused(tmp_path, marker, tiny_model, name):
    folder = tmp_path / "export"
    folder.mkdir()
    write_open_clip_folder(tiny_model, folder, verify=False)
    (folder / "open_clip_model.safetensors").unlink()
    evil_file(folder / name, marker)
    with pytest.raises(Exception):  # noqa: B017 (open_clip's error; the marker is what matters)
        flip.load(folder)
    assert not marker.exists()


# ---------------------------------------------------------------- DeepSpeed ZeRO folders


def _zero_checkpoint(tmp_path: Path, stage: int) -> Path:
    """A real ZeRO checkpoint folder, from one step of DeepSpeed on the CPU accelerator."""
    cfg = compose_train_config(
        tmp_path / f"zero{stage}",
        [f"trainer=deepspeed_zero{stage}", "trainer.accelerator=cpu", "trainer.devices=1",
         "trainer.precision=32-true", "trainer.max_steps=1", "evaluate=false"],
    )  # fmt: skip
    train(cfg)
    return tmp_path / f"zero{stage}" / "run" / "checkpoints" / "last.ckpt"


def _shard(folder: Path, kind: str) -> Path:
    tag = folder / (folder / "latest").read_text().strip()
    return next(tag.glob(f"*{kind}_states.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("kind", ["model", "optim"])
def test_zero_to_fp32_never_runs_a_crafted_shard(tmp_path, marker, deepspeed_on_cpu, stage, kind):
    folder = _zero_checkpoint(tmp_path, stage)
    consolidate(folder, tmp_path / "good.ckpt")  # the real shards convert: DeepSpeed's classes are allowed
    shard = _shard(folder, kind)
    evil_file(shard, marker, payload_key="module" if kind == "model" else "optimizer_state_dict")
    with pytest.raises(UnsafeCheckpointError) as err:
        zero_to_fp32([str(folder), str(tmp_path / "out.ckpt")])
    assert_refused(err.value, shard)
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "optim"])
def test_deepspeed_resume_never_runs_a_crafted_shard(tmp_path, marker, deepspeed_on_cpu, kind):
    folder = _zero_checkpoint(tmp_path, 2)
    shard = _shard(folder, kind)
    evil_file(shard, marker, payload_key="module" if kind == "model" else "optimizer_state_dict")
    cfg = compose_train_config(
        tmp_path / "zero2",
        ["trainer=deepspeed_zero2", "trainer.accelerator=cpu", "trainer.devices=1",
         "trainer.precision=32-true", "trainer.max_steps=2", "evaluate=false", f"ckpt_path={folder}"],
    )  # fmt: skip
    with pytest.raises(UnsafeCheckpointError) as err:
        train(cfg)
    assert_refused(err.value, shard)
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeed_resume_from_a_crafted_folder_through_train_py(tmp_path, marker):
    """The issue's command, as typed: DeepSpeed's engine unpickles the model-state shard first."""
    folder = tmp_path / "last.ckpt"
    atomic_write_text(folder / "latest", "step1")
    evil_file(folder / "step1" / "mp_rank_00_model_states.pt", marker, payload_key="module")
    evil_file(folder / "step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker, "optimizer_state_dict")
    shards = Path(write_caption_shards(tmp_path / "shards", count=20, per_shard=10)[0]).parent
    env = flip_root_env(tmp_path)
    args = [*SHARDS_BASE, f"data.train_shards={shards}", "trainer=deepspeed_zero2", "trainer.accelerator=cpu",
            "trainer.devices=1", "trainer.precision=32-true", f"ckpt_path={folder}",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "mp_rank_00_model_states.pt" in done.stderr and "refused" in done.stderr, done.stderr[-3000:]
    assert not marker.exists()


# ---------------------------------------------------------------- unreadable checkpoints are named


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good)
    data = good.read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    (tmp_path / "folder.ckpt").mkdir()
    return {name: tmp_path / f"{name}.ckpt" for name in ("empty", "truncated", "text", "folder")}


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "folder"])
def test_an_unreadable_checkpoint_is_named_with_what_is_expected(tmp_path, kind):
    path = _bad_checkpoints(tmp_path)[kind]
    loaders = (read_checkpoint, AtomicCheckpointIO().load_checkpoint) + (
        () if kind == "folder" else (flip.load,)
    )
    for load in loaders:
        with pytest.raises(CheckpointError) as err:
            load(path)
        message = str(err.value)
        assert str(path) in message and "weights_only" not in message, message
        assert ("folder" if kind == "folder" else "empty" if kind == "empty" else "not a readable") in message


@pytest.mark.parametrize("kind", ["empty", "truncated", "folder"])
def test_train_py_names_an_unreadable_ckpt_path(tmp_path, kind):
    path = _bad_checkpoints(tmp_path)[kind]
    shards = Path(write_caption_shards(tmp_path / "shards", count=20, per_shard=10)[0]).parent
    cfg = compose_train_config(tmp_path, [f"data.train_shards={shards}", f"ckpt_path={path}"], SHARDS_BASE)
    with pytest.raises(CheckpointError, match=r"give a checkpoint written by train\.py") as err:
        train(cfg)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- file modes follow the umask


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_mode_a_plain_open_would(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "wb") as f:
            f.write(b"x")
        with atomic_file(tmp_path / "atomic.tar") as f:
            f.write(b"x")
        atomic_torch_save({"w": torch.ones(1)}, tmp_path / "last.ckpt")
        atomic_write_text(tmp_path / "stats.json", "{}")
    finally:
        os.umask(old)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("atomic.tar", "last.ckpt", "stats.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
