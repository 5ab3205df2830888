"""Shared fixtures: offline environment, a tiny model, small shards, composed Hydra configs and one
trained demo run. Plain helpers live in tests/helpers."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup would hang tests on retries
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch
from omegaconf import DictConfig

from .helpers import (
    COLOURS,
    LAUNCHER_VARIABLES,
    TINY_ARCH,
    TrainedRun,
    compose_train_config,
    save_checkpoint,
    write_caption_shards,
    write_square,
)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests' models and batches are tiny: a second intra-op thread only synchronises with the
    first, and on a machine shared with other jobs it waits for a core. Processes that tests start
    choose their own (OMP_NUM_THREADS, torch.set_num_threads in workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model():
    from flip.models import build_model

    torch.manual_seed(0)
    return build_model("flip-test-tiny", TINY_ARCH).eval()


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_model) -> Path:
    """The untrained tiny model as a train.py checkpoint: for tests of loading, not of what was learned."""
    return save_checkpoint(tiny_model, tmp_path / "tiny.ckpt")


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory) -> TrainedRun:
    """The demo recipe (CLIP + FILIP on FaceShapes) at test size, trained once per session through
    train.py's code, with its end-of-run evaluation: the run every test that only loads, evaluates,
    exports or queries a trained model shares. Tests must not write into it (copy it to tmp_path);
    a change fails this fixture's teardown."""
    from flip.training.run import train

    root = tmp_path_factory.mktemp("trained_demo")
    cfg = compose_train_config(root)
    trained = TrainedRun(root, cfg, train(cfg))
    yield trained
    assert not trained.changes(), f"a test wrote into the shared trained_demo run: {trained.changes()}"


@pytest.fixture
def caption_shards(tmp_path) -> list[str]:
    return write_caption_shards(tmp_path / "shards", count=40, per_shard=10)


@pytest.fixture
def train_config(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_train_config(tmp_path, list(overrides))

    return make


@pytest.fixture
def clean_launcher_env(monkeypatch):
    """No SLURM/torchrun variables from the machine running the tests; restored after."""
    for name in list(os.environ):
        if name.startswith(LAUNCHER_VARIABLES):
            monkeypatch.delenv(name)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # registers the variable for restoring, then:
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def deepspeed_on_cpu(clean_launcher_env):
    """DeepSpeed in this process, on gloo; the process group and DeepSpeed's globals are undone after.

    DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce (~1 min, needs a C++
    toolchain) that one process never uses; it is optional in DeepSpeed and left out here.
    """
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    clean_launcher_env.setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    ds_comm.cdb = None
    importlib.reload(ds_groups)  # its cached process groups belong to the destroyed world


# Two small benchmarks in the layouts users give eval/*.py: coloured squares, so a tiny model can
# be checked against an independent computation.
@pytest.fixture
def csv_benchmark(tmp_path) -> Path:
    """Coloured squares with attribute columns (is_red, is_blue) and captions, in train/val/test CSVs."""
    root = tmp_path / "csvbench"
    for split, n in (("train", 24), ("val", 9), ("test", 12)):
        rows = ["image,is_red,is_blue,caption"]
        for i in range(n):
            name = list(COLOURS)[i % 3]
            write_square(root / "img" / f"{split}{i}.png", COLOURS[name], seed=i + 100 * len(split))
            rows.append(
                f"img/{split}{i}.png,{int(name == 'red')},{int(name == 'blue')},a {name} square number {i}"
            )
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def folder_benchmark(tmp_path) -> Path:
    root = tmp_path / "folderbench"
    for split, n in (("train", 8), ("test", 4)):
        for name, colour in COLOURS.items():
            for i in range(n):
                write_square(root / split / name / f"{i}.png", colour, seed=i + 10 * n)
    return root


@pytest.fixture(scope="session")
def faceshapes_parts(tmp_path_factory) -> Path:
    """FaceShapes with part masks and landmarks, 32 / 16 / 16 faces at 32 px: the dense fine-tunes' data."""
    from flip.data.faceshapes import ensure_faceshapes

    root = tmp_path_factory.mktemp("faceshapes_parts") / "fs"
    ensure_faceshapes(
        root, {"train": 32, "val": 16, "test": 16}, 32, image_size=32, num_workers=1, parts=True
    )
    return root
