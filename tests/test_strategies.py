"""Trainer configs: each composes and builds its strategy on this CPU machine; DeepSpeed ZeRO-2/3
really train through train.py's code on the CPU accelerator, checkpoint, resume and convert to
one fp32 file; a real 2-process DDP run goes through `python train.py trainer=ddp`."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import (
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from omegaconf import OmegaConf

import flip
from flip.config import num_nodes, register_resolvers
from flip.training.deepspeed import DeepSpeedStrategy, consolidate, is_zero_checkpoint
from flip.training.module import FlipLitModule
from flip.training.optim import optimizer_class
from flip.training.run import train

from .helpers import ROOT, TINY_OVERRIDES, csv_losses, run_train_py, write_caption_shards

TRAINER_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "trainer").glob("*.yaml") if p.stem != "default")


def _trainer(cfg):
    register_resolvers()
    return instantiate(cfg.trainer, callbacks=[], logger=False, enable_progress_bar=False)


def test_the_trainer_configs_are_the_ones_the_issue_asks_for():
    assert {"cpu", "gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "multinode"} <= set(TRAINER_CONFIGS)


@pytest.mark.parametrize("name", TRAINER_CONFIGS)
def test_every_trainer_config_composes_and_builds_its_strategy(train_config, clean_launcher_env, name):
    # this machine has no GPU: GPU configs are built on the CPU accelerator, everything else as written
    cfg = train_config(f"trainer={name}", "trainer.accelerator=cpu")
    trainer = _trainer(cfg)
    strategy = trainer.strategy
    assert str(trainer.precision) == str(cfg.trainer.precision)
    assert trainer.gradient_clip_algorithm == "norm"
    if name.startswith("deepspeed"):
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        assert isinstance(strategy, DeepSpeedStrategy) and isinstance(strategy, LightningDeepSpeedStrategy)
        zero = strategy.config["zero_optimization"]
        assert isinstance(strategy.config, dict)  # a plain dict, as DeepSpeed wants it
        assert zero["stage"] == (2 if "zero2" in name else 3) and strategy.zero_stage_3 == (
            zero["stage"] == 3
        )
        validated = DeepSpeedZeroConfig(**zero)  # DeepSpeed's own schema: unknown keys are errors
        offload = "offload" in name
        assert (validated.offload_optimizer.device == "cpu") == offload
        expected = "DeepSpeedCPUAdam" if offload else "AdamW"
        assert optimizer_class(strategy).__name__ == expected
    elif name in ("ddp", "multinode"):
        assert isinstance(strategy, DDPStrategy)
        assert trainer.num_nodes == 1 and isinstance(strategy.cluster_environment, LightningEnvironment)
    else:
        assert isinstance(strategy, SingleDeviceStrategy)


def test_precision_options_reach_the_trainer(train_config):
    # fp16 autocast exists on GPUs only: on the CPU Lightning substitutes bf16 (with a warning)
    expected = {"32-true": "32-true", "bf16-mixed": "bf16-mixed", "16-mixed": "bf16-mixed"}
    for precision, on_cpu in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = _trainer(train_config(f"trainer.precision={precision}", "trainer.accelerator=cpu"))
        assert str(trainer.precision) == on_cpu


def test_multinode_under_slurm_takes_nodes_and_ranks_from_slurm(train_config, clean_launcher_env):
    env = {
        "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[01-02]",
        "SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "flip",
    }  # fmt: skip
    for key, value in env.items():
        clean_launcher_env.setenv(key, value)
    trainer = _trainer(train_config("trainer=multinode", "trainer.accelerator=cpu", "trainer.devices=2"))
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.num_nodes, trainer.world_size, trainer.global_rank, trainer.local_rank) == (2, 4, 3, 1)
    assert trainer.node_rank == 1


def test_multinode_under_torchrun_takes_nodes_and_ranks_from_torchrun(train_config, clean_launcher_env):
    env = {
        "TORCHELASTIC_RUN_ID": "flip", "WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "2", "RANK": "4",
        "LOCAL_RANK": "0", "GROUP_RANK": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
    }  # fmt: skip
    for key, value in env.items():
        clean_launcher_env.setenv(key, value)
    trainer = _trainer(train_config("trainer=multinode", "trainer.accelerator=cpu", "trainer.devices=2"))
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
    assert (trainer.num_nodes, trainer.world_size, trainer.global_rank, trainer.node_rank) == (3, 6, 4, 2)


def test_num_nodes_comes_from_the_launcher():
    assert num_nodes({}) == 1
    assert num_nodes({"SLURM_NNODES": "16"}) == 16
    assert num_nodes({"WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8"}) == 4
    with pytest.raises(ValueError, match="WORLD_SIZE=6 is not a multiple of LOCAL_WORLD_SIZE=4"):
        num_nodes({"WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "4"})


# ---------------------------------------------------------------- DeepSpeed ZeRO on the CPU accelerator


def _deepspeed_config(train_config, stage: int, *overrides: str):
    return train_config(
        f"trainer=deepspeed_zero{stage}", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.precision=32-true", "callbacks.model_checkpoint.every_n_train_steps=1", *overrides,
    )  # fmt: skip


@pytest.mark.slow
def test_zero3_trains_checkpoints_and_evaluates_from_one_fp32_file(train_config, tmp_path, deepspeed_on_cpu):
    results = train(_deepspeed_config(train_config, 3, "trainer.max_steps=3", "loss=clip_filip"))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    assert is_zero_checkpoint(last)
    tags = [p.name for p in last.iterdir() if p.is_dir()]
    assert tags == [(last / "latest").read_text()]  # older tags are removed once `latest` moved on
    # run.py consolidated the shards and evaluated the single file
    single = ckpt_dir / "last.fp32.ckpt"
    assert results["eval"]["checkpoint"] == str(single)
    saved = torch.load(single, weights_only=True)  # nothing but tensors and plain containers
    assert saved["global_step"] == 3 and saved["state_dict"]["model.clip.logit_scale"].shape == ()
    model = flip.load(single)
    again = consolidate(last, tmp_path / "again.ckpt")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, again["state_dict"]["model." + key], rtol=0, atol=0)
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


@pytest.mark.slow
def test_zero2_resumes_from_its_checkpoint_folder(train_config, tmp_path, deepspeed_on_cpu):
    cfg = _deepspeed_config(train_config, 2, "evaluate=false", "trainer.max_steps=2")
    train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = consolidate(last, tmp_path / "step2.ckpt")
    train(_deepspeed_config(train_config, 2, "evaluate=false", "trainer.max_steps=4", f"ckpt_path={last}"))
    second = consolidate(last, tmp_path / "step4.ckpt")
    assert (first["global_step"], second["global_step"]) == (2, 4)
    assert sorted(csv_losses(tmp_path / "run")) == [0, 1, 2, 3]  # steps 2 and 3 only after the resume
    changed = [
        k for k in first["state_dict"] if not torch.equal(first["state_dict"][k], second["state_dict"][k])
    ]
    assert "model.clip.visual.conv1.weight" in changed


@pytest.mark.slow
def test_zero2_in_bf16_trains_the_demo_s_convolutional_stem(train_config, tmp_path, deepspeed_on_cpu):
    """DeepSpeed's bf16 mode casts the weights but not the buffers: the stem's batch norms met
    bf16 weights beside float32 statistics and the first step failed (seen on a GPU)."""
    cfg = _deepspeed_config(
        train_config, 2, "evaluate=false", "trainer.max_steps=2", "trainer.precision=bf16-mixed",
        "model.image_stem={channels:[8,16,32]}",
    )  # fmt: skip
    train(cfg)
    saved = consolidate(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "single.ckpt")
    state = saved["state_dict"]
    assert saved["global_step"] == 2
    assert state["model.clip.visual.conv1.1.running_mean"].dtype == torch.float32
    assert int(state["model.clip.visual.conv1.1.num_batches_tracked"]) == 2
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
def test_under_deepspeed_a_non_finite_loss_leaves_the_weights_alone(deepspeed_on_cpu):
    from .helpers import MODEL, OPTIM, NaNLoss, fit_briefly, loss_file

    torch.manual_seed(6)
    module = FlipLitModule(MODEL, loss_file("clip")[0], OPTIM)
    poison = NaNLoss(steps={1})
    strategy = instantiate(OmegaConf.load(ROOT / "conf" / "trainer" / "deepspeed_zero2.yaml").strategy)
    fit_briefly(module, [poison], steps=3, strategy=strategy, devices=1, precision="32-true")
    assert module.nonfinite.skipped == 1
    for key, value in poison.weights[1].items():  # step 1 ran at a zero rate with zero gradients
        torch.testing.assert_close(poison.weights[2][key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(
        poison.weights[1]["clip.text_projection"], poison.weights[0]["clip.text_projection"]
    )
    # the zero rate of the skipped step does not stick: the schedule sets the next one (cosine over 3 steps)
    assert [poison.rates[s] for s in range(3)] == pytest.approx([1e-3, 7.5e-4, 2.5e-4])


def test_consolidate_names_what_it_wants(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a DeepSpeed checkpoint folder"):
        consolidate(tmp_path, tmp_path / "out.ckpt")


# ---------------------------------------------------------------- DDP: two real processes


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_through_train_py_and_the_loss_falls(tmp_path):
    shards = write_caption_shards(tmp_path / "shards", count=256, per_shard=64)
    overrides = [o for o in TINY_OVERRIDES if o.startswith(("model.", "trainer.enable", "optim."))] + [
        "~experiment", "trainer=ddp", "trainer.devices=2", "trainer.max_steps=12",
        "trainer.log_every_n_steps=1",
        "data=shards", f"data.train_shards={Path(shards[0]).parent}", "data.batch_size=16",
        "data.num_workers=0", "data.shuffle_buffer=64", "optim.lr=2e-3", "optim.warmup_steps=3",
        "evaluate=false", "callbacks.model_checkpoint.every_n_train_steps=10", "~callbacks.progress_bar",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    done = run_train_py(*overrides, flip_root=tmp_path, threads=1)
    assert "MEMBER: 2/2" in done.stdout + done.stderr  # both ranks joined the process group
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    losses = [loss for _, loss in sorted(csv_losses(tmp_path / "run").items())]
    assert len(losses) == 12, sorted(csv_losses(tmp_path / "run").items())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, losses  # from ~log(32) towards log(8): 4 colours in a global batch of 32
