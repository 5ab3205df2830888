"""Hydra multirun: `python train.py -m loss=clip,siglip` trains one run per value, each in its own folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import SHARDS_BASE, run_train_py, write_caption_shards


@pytest.mark.slow
def test_a_multirun_sweep_trains_every_combination(tmp_path):
    shards = Path(write_caption_shards(tmp_path / "shards", count=32, per_shard=32)[0]).parent
    overrides = [o for o in SHARDS_BASE if not o.startswith("~callbacks")] + [
        f"data.train_shards={shards}", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=8",
        "trainer.max_steps=1", "trainer.val_check_interval=null", "~callbacks.progress_bar",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    run_train_py("-m", "loss=clip,siglip", *overrides, flip_root=tmp_path, threads=1)
    losses = {}
    for job in ("0", "1"):
        saved = torch.load(tmp_path / "sweep" / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert saved["global_step"] == 1
        losses[job] = saved["hyper_parameters"]["loss"]
    assert set(losses["0"]["terms"]) == {"clip"} and set(losses["1"]["terms"]) == {"siglip"}
