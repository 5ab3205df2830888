"""Shared fixtures: offline environment, a tiny model, small shards and composed Hydra configs."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup would hang tests on retries
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A model small enough that a training step takes milliseconds.
TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def loss_file(name: str) -> tuple[dict, dict]:
    """conf/loss/<name>.yaml as (the loss config, the model settings it makes): conf/loss/siglip.yaml
    sits at the top of the config (`# @package _global_`) to set SigLIP's temperature init too."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "loss" / f"{name}.yaml"))
    if "terms" in cfg:
        return cfg, {}
    return cfg["loss"], cfg.get("model", {})


TINY_OVERRIDES = [
    "model.name=flip-test-tiny",
    "model.arch.embed_dim=32",
    "model.arch.vision_cfg.image_size=32",
    "model.arch.vision_cfg.width=32",
    "model.arch.vision_cfg.layers=1",
    "model.arch.vision_cfg.head_width=16",
    "model.arch.text_cfg.context_length=24",
    "model.arch.text_cfg.width=32",
    "model.arch.text_cfg.layers=1",
    "data.num_train=96",
    "data.num_val=32",
    "data.num_test=64",
    "data.samples_per_shard=32",
    "data.image_size=48",
    "data.batch_size=16",
    "data.val_batch_size=32",
    "data.num_workers=0",
    "data.generator_workers=1",
    "data.shuffle_buffer=32",
    "eval.batch_size=32",
    "eval.num_workers=0",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "optim.warmup_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "~callbacks.progress_bar",
]

# The tiny model on (image, caption) shards (data=shards) instead of FaceShapes, no evaluation.
_NOT_DATA = ("model", "trainer", "optim", "callbacks", "~callbacks")
SHARDS_BASE = [
    *(o for o in TINY_OVERRIDES if o.split(".")[0] in _NOT_DATA),
    "~experiment",
    "data=shards",
    "evaluate=false",
]


def run_train_py(*args: str, flip_root: Path, threads: int | None = None) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess, as a user types it; a failure shows its stderr."""
    env = {**os.environ, "FLIP_ROOT": str(flip_root)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


class Poisoned(torch.nn.Module):
    """A loss whose every term turns NaN while `now()` is true: the non-finite guard's input."""

    def __init__(self, criterion, now) -> None:
        super().__init__()
        self.criterion, self.now, self.requires_tokens = criterion, now, criterion.requires_tokens

    def forward(self, features):
        losses = self.criterion(features)
        return {k: v * float("nan") for k, v in losses.items()} if self.now() else losses


@pytest.fixture(scope="session")
def tiny_model():
    from flip.models import build_model

    torch.manual_seed(0)
    return build_model("flip-test-tiny", TINY_ARCH).eval()


def write_caption_shards(
    directory: Path, count: int, per_shard: int, seed: int = 0, with_json: bool = True
) -> list[str]:
    """Random-colour images with captions naming the colour: a minimal (image, caption) dataset."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    urls = []
    for shard in range((count + per_shard - 1) // per_shard):
        path = directory / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                name = rng.choice(sorted(colours))
                buffer = io.BytesIO()
                Image.new("RGB", (40, 40), colours[name]).save(buffer, format="JPEG")
                sample = {"__key__": f"{i:06d}", "jpg": buffer.getvalue(), "txt": f"a {name} square"}
                if with_json:
                    sample["json"] = json.dumps({"colour": name, "red": name == "red"}).encode()
                sink.write(sample)
        urls.append(str(path))
    return urls


@pytest.fixture
def caption_shards(tmp_path) -> list[str]:
    return write_caption_shards(tmp_path / "shards", count=40, per_shard=10)


def compose_train_config(
    tmp_path: Path, overrides: list[str] = (), base: list[str] = TINY_OVERRIDES
) -> DictConfig:
    """The real train.py config, as Hydra composes it, pointed at tmp_path.

    `base` comes first: the tiny model and FaceShapes sizes, or e.g. SHARDS_BASE for data=shards.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*base, *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def train_config(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_train_config(tmp_path, list(overrides))

    return make
