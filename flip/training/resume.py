"""Random-number-generator state in checkpoints, so a resumed run draws what the original would have.

Lightning restores weights, optimizer, scheduler and loop counters, but not the generators:
after a restart, dropout masks and anything else drawn from the global generators would differ
from the uninterrupted run. The data stream does not draw from them at all (its shards, shuffle
and augmentations are seeded by position, see `flip.data.pipeline`), so restoring these at the
start of training is enough for the next step to be the one the original run took.

States are stored as tensors and lists of ints, so checkpoints still load with
`weights_only=True`. Each rank draws from generators of its own (`PerRankSeed`), so a checkpoint
holds every rank's states and each rank restores its own.

Also here: which checkpoint `ckpt_path=auto` resumes from.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["kind"],
            saved["keys"].numpy().astype(np.uint32),
            saved["pos"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------- one seed per rank


def rank_seed(seed: int, rank: int) -> int:
    """A seed of rank `rank`'s own, unrelated to other ranks' and other runs' (seed 42 rank 1 is not
    seed 43 rank 0); rank 0 keeps `seed` itself, so a one-process run draws what it always drew."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class PerRankSeed(L.Callback):
    """Every rank starts from the same weights and draws its own dropout masks and augmentations.

    `seed_everything` runs before the model is built with one seed, so every rank builds the same
    initial weights; seeding every rank alike for training too would give all ranks the same
    dropout masks and patch-dropout choices, as if the global batch were smaller. At the start of
    training each rank > 0 is reseeded with its own seed (before a resumed run restores the
    generators it saved, which `FlipLitModule.on_train_start` does after this).
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank > 0:
            seed = rank_seed(self.seed, trainer.global_rank)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)


def gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's generator states, by global rank (a collective: call it on every rank)."""
    state = capture_rng_state()
    if world_size < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(states, state)
    return states


def own_rng_state(saved: Any, rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's state from a checkpoint: a list by rank, or one state (checkpoints before the list)."""
    if isinstance(saved, dict):
        return saved
    if not saved:
        return None
    if len(saved) != world_size:
        if rank == 0:
            log.warning(
                "the checkpoint holds the random generators of %d ranks and this run has %d: each rank "
                "keeps its fresh per-rank seed, so dropout draws will differ from the interrupted run",
                len(saved), world_size,
            )  # fmt: skip
        return None
    return saved[rank]


# ---------------------------------------------------------------- which checkpoint to resume from

AUTO = "auto"
_HPC_NAME = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def resume_candidates(output_dir: str | os.PathLike) -> list[Path]:
    """Whole checkpoints of a run folder: `checkpoints/last.ckpt` (a file, or a DeepSpeed folder with
    its `latest`) and Lightning's `hpc_ckpt_<N>.ckpt`, by exact name: a temp file a SIGKILL left
    (`.hpc_ckpt_3.ckpt.x1y2.tmp`) is never taken for one, nor parsed as checkpoint number 312."""
    root = Path(output_dir)
    found = []
    last = root / "checkpoints" / "last.ckpt"
    if last.is_file() or (last / "latest").is_file():
        found.append(last)
    for folder in (root, root / "checkpoints"):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if _HPC_NAME.fullmatch(p.name) and p.is_file()]
    return found


def _saved_at(path: Path) -> float:
    return (path / "latest").stat().st_mtime if path.is_dir() else path.stat().st_mtime


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike) -> str | None:
    """`ckpt_path=auto`: the newest whole checkpoint of the run folder, or None (a fresh start).

    A requeued Slurm job runs the same command again; with `auto` it continues from whatever was
    written last, the periodic `last.ckpt` or a preemption save, and starts afresh the first time.
    """
    if ckpt_path != AUTO:
        return ckpt_path
    candidates = resume_candidates(output_dir)
    if not candidates:
        log.info("ckpt_path=auto: no checkpoint in %s yet, starting from scratch", output_dir)
        return None
    newest = max(candidates, key=_saved_at)
    log.info("ckpt_path=auto: resuming from %s, the newest of %s", newest, [str(c) for c in candidates])
    return str(newest)


def warn_if_optim_changed(saved: Any, current: Any) -> list[str]:
    """Say which optimizer settings differ from the checkpoint's; the checkpoint's stay in force.

    Resuming restores the optimizer and the learning-rate schedule as they were (what makes a
    resumed run equal an uninterrupted one), so a new `optim.lr` on the command line would not
    apply, silently. Decided: keep the checkpoint's and say so, naming both values.
    """
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return []
    changed = [
        f"optim.{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if changed:
        log.warning(
            "resuming with optimizer settings that differ from the checkpoint's (%s): the run continues "
            "with the checkpoint's optimizer state and learning-rate schedule, so the new values do not "
            "apply. To train on with them, start a new run initialised from these weights "
            "(model.image_init/text_init={checkpoint: ...}) instead of resuming",
            "; ".join(changed),
        )
    return changed
