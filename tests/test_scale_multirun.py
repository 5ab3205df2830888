"""Hydra multirun: `python train.py -m loss=clip,siglip` trains one run per value, each in its own folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .helpers import SHARDS_BASE, run_train_py, write_caption_shards


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


def test_a_sweep_whose_ranks_lightning_would_start_by_rerunning_the_command_is_refused(
    tmp_path, caption_shards, monkeypatch
):
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    from omegaconf import read_write

    from flip.training.run import train

    from .helpers import compose_train_config

    def children_started(self):  # on the old code: stop here instead of re-running pytest's argv
        raise AssertionError("Lightning started DDP children for a multirun job")

    monkeypatch.setattr(_SubprocessScriptLauncher, "_call_children_scripts", children_started)
    ddp = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"data.train_shards={caption_shards}",
    ]
    cfg = compose_train_config(tmp_path, ddp, base=SHARDS_BASE)
    with read_write(cfg.hydra):
        cfg.hydra.mode = "MULTIRUN"
    HydraConfig().set_config(cfg)
    with pytest.raises(
        ValueError, match=r"multirun \(-m\).*2 processes.*each of them would run the whole sweep"
    ):
        train(cfg)
    # torchrun (or srun) started the ranks: Lightning re-runs nothing, the job may run
    for name, value in {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    import lightning as L

    from flip.training.sweeps import check_sweep_launch

    check_sweep_launch(L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False))
