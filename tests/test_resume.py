"""Exact resume: a run interrupted and resumed trains on the same batches with the same losses as
an uninterrupted one; a run killed with SIGKILL resumes from its last (always whole) checkpoint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from flip.data.foils import FoilMaker
from flip.data.pipeline import EpochSeed, SampleTransform, make_loader, train_pipeline
from flip.training.checkpoint_io import atomic_torch_save
from flip.training.resume import capture_rng_state, restore_rng_state
from flip.training.run import train

from .helpers import (
    ROOT,
    SHARDS_BASE,
    compose_train_config,
    csv_losses,
    flip_root_env,
    write_caption_shards,
)


class Interrupted(RuntimeError):
    pass


class InterruptAt(L.Callback):
    """Stands for a crash: raises when the run is about to train step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"interrupted before step {self.step}")


def _shard_overrides(shards: Path, workers: int) -> list[str]:
    return [
        f"data.train_shards={shards}", "data.batch_size=8", f"data.num_workers={workers}",
        "data.shuffle_buffer=16", "data.samples_per_epoch=100000", "trainer.max_steps=6",
        "trainer.val_check_interval=null", "callbacks.model_checkpoint.every_n_train_steps=1",
        "optim.warmup_steps=2",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("foils", [False, True])
def test_resume_after_interruption_continues_with_the_next_batch_and_loss(tmp_path, foils, workers=0):
    shards = Path(write_caption_shards(tmp_path / "shards", count=120, per_shard=20)[0]).parent
    # patch dropout draws from the global generator at every step: the RNG state must be restored too
    overrides = [*_shard_overrides(shards, workers), "+model.arch.vision_cfg.patch_dropout=0.25"]
    if foils:  # data.hard_negatives: the foils, too, are those of the uninterrupted run
        table = tmp_path / "foils.yaml"
        table.write_text("colour: {red: [blue, green], blue: [red], green: [red], yellow: [blue]}\n")
        overrides.append(f"data.hard_negatives={{source:table,per_caption:2,table:{table}}}")
        # the foil choice term ramping in across the interruption (weight 1 at step 3, 2 from 4 on):
        # the resumed run weighs it by the trainer's step, as the uninterrupted run did
        choice = "loss.terms.clip.loss.foil_choice_"
        overrides += [f"{choice}weight=2.0", f"{choice}start_step=2", f"{choice}ramp_steps=2"]
    # with the in-memory cache, as the demo trains: the resumed process starts with an empty one
    overrides.append("data.cache_in_memory=true")
    train(compose_train_config(tmp_path / "whole", overrides, SHARDS_BASE))
    whole = csv_losses(tmp_path / "whole" / "run")
    assert sorted(whole) == [0, 1, 2, 3, 4, 5]
    logged = (tmp_path / "whole" / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert ("train/foil_fraction" in logged) == foils

    crash = "+callbacks.crash={_target_: tests.test_resume.InterruptAt, step: 3}"
    with pytest.raises(Interrupted):
        train(compose_train_config(tmp_path / "split", [*overrides, crash], SHARDS_BASE))
    last = tmp_path / "split" / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3
    # the data stream's position is in the checkpoint: epoch 0, 3 batches consumed
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 3}]
    train(compose_train_config(tmp_path / "split", [*overrides, f"ckpt_path={last}"], SHARDS_BASE))
    before, resumed = csv_losses(tmp_path / "split" / "run", 0), csv_losses(tmp_path / "split" / "run", 1)
    assert sorted(before) == [0, 1, 2] and sorted(resumed) == [3, 4, 5]
    # same batches, same weights, same optimizer and schedule: the same losses, to float rounding
    for step in range(6):
        assert {**before, **resumed}[step] == pytest.approx(whole[step], rel=0, abs=1e-6), (
            step,
            before,
            resumed,
            whole,
        )


@pytest.mark.parametrize(
    ("workers", "cache", "foils"),
    [
        (0, False, False),
        (2, False, False),
        (0, True, False),
        (2, True, False),
        (0, False, True),
        (2, True, True),
    ],
)
def test_the_training_stream_continues_after_the_batches_already_consumed(
    caption_shards, tiny_model, workers, cache, foils, tmp_path
):
    maker = None
    if foils:  # data.hard_negatives: each sample's foils are drawn anew per place in the stream
        table = tmp_path / "foils.yaml"
        table.write_text("colour: {red: [blue, green], blue: [red, yellow], green: [red], yellow: [blue]}\n")
        maker = FoilMaker(source="auto", per_caption=2, table=str(table), seed=7)

    def loader():
        transform = SampleTransform(
            tiny_model.preprocess_train, tiny_model.tokenizer, cache_tokens=cache, foils=maker
        )
        epoch_seed = EpochSeed()
        pipeline, batches = train_pipeline(
            caption_shards, transform, batch_size=4, samples_per_epoch=400, world_size=1,
            num_workers=workers, shuffle_buffer=8, seed=7, epoch_seed=epoch_seed, cache_in_memory=cache,
            with_json=foils,
        )  # fmt: skip
        return make_loader(pipeline, workers, batches, epoch_seed=epoch_seed)

    torch.manual_seed(0)
    whole = [batch for _, batch in zip(range(8), loader(), strict=False)]
    first = loader()
    for _, _batch in zip(range(5), first, strict=False):
        pass
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 5}
    torch.manual_seed(123)  # augmentation must not depend on the global generator
    again = loader()
    again.load_state_dict(state)
    rest = [batch for _, batch in zip(range(3), again, strict=False)]
    for expected, got in zip(whole[5:], rest, strict=True):
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)  # images: same samples, same crops
        assert torch.equal(got[1], expected[1])
        assert len(got) == len(expected) == (4 if foils else 2)
        for mine, theirs in zip(got[2:], expected[2:], strict=True):  # the same foils
            assert torch.equal(mine, theirs)
    assert not torch.equal(rest[0][0], whole[0][0])  # not the first shards again
    if foils:  # captions with two colours' foils, and different ones at different places
        assert all(batch[3][:, 0].all() for batch in whole)
        drawn: dict[tuple, set] = {}
        for batch in whole:
            for caption, foil in zip(batch[1].tolist(), batch[2][:, 0].tolist(), strict=True):
                drawn.setdefault(tuple(caption), set()).add(tuple(foil))
        assert max(map(len, drawn.values())) > 1


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == draws[:2]
    assert torch.equal(torch.rand(3), draws[2])


def test_a_temp_file_left_by_a_killed_writer_goes_with_the_next_save(tmp_path):
    stale = tmp_path / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    atomic_torch_save({"step": 1}, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_from_its_last_whole_checkpoint(tmp_path):
    shards = Path(write_caption_shards(tmp_path / "shards", count=120, per_shard=20)[0]).parent
    overrides = [*SHARDS_BASE, *_shard_overrides(shards, 0), "trainer.max_steps=100000"]
    checkpoints = tmp_path / "run" / "checkpoints"
    env = flip_root_env(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    loads, step, deadline = 0, 0, time.monotonic() + 240
    try:
        while step < 8 and proc.poll() is None and time.monotonic() < deadline:
            # every checkpoint that exists, whenever it is looked at, is a whole one
            for path in checkpoints.glob("*.ckpt"):
                try:
                    step = max(step, torch.load(path, weights_only=True)["global_step"])
                    loads += 1
                except FileNotFoundError:  # replaced between glob and open: the rename is atomic
                    pass
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and loads > 0 and step >= 8
    killed_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert killed_at >= step

    cfg = compose_train_config(tmp_path, [*overrides, f"ckpt_path={checkpoints / 'last.ckpt'}"], base=[])
    cfg.trainer.max_steps = killed_at + 2
    train(cfg)
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == killed_at + 2
    assert sorted(csv_losses(tmp_path / "run", 1)) == [killed_at, killed_at + 1]  # continued, not restarted
    assert not list(checkpoints.glob(".*.tmp"))  # a temp file the kill left behind is cleaned up
