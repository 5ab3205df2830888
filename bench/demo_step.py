"""FLIP's training step on the demo's batches, outside a trainer: what the step benches time.

The step is the module's `training_step` with the recipe's loss, backward and the optimizer's
step, on FaceShapes batches from the recipe's own loader; nothing is logged (no trainer to log to).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from itertools import cycle, islice
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

from bench.run_config import run_config
from flip.training.module import FlipLitModule, module_options
from flip.training.optim import build_optimizer


def build(overrides: list[str], work: Path, data: Path):
    """(config, module, optimizer) for the recipe `overrides`, from seed 0's initial weights."""
    cfg = run_config("train", overrides, work, data)
    torch.manual_seed(0)
    module = FlipLitModule(cfg.model, cfg.loss, cfg.optim, **module_options(cfg))
    # training_step asks the trainer for the world size; the optimizer needs no schedule here
    module.trainer = L.Trainer(max_steps=cfg.trainer.max_steps, logger=False, enable_checkpointing=False)
    optimizer = build_optimizer(module.model, cfg.optim)
    module.train()
    module.log = module.log_dict = lambda *args, **kwargs: None
    return cfg, module, optimizer


def batches_of(cfg, module: FlipLitModule, count: int) -> list:
    """The recipe's first `count` training batches (FaceShapes generated under data_dir if absent)."""
    datamodule = instantiate(cfg.data)
    datamodule.use_model(module.model)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return list(islice(datamodule.train_dataloader(), count))


def step_seconds(module: FlipLitModule, optimizer, batch) -> float:
    """Wall seconds of one training step: forward and loss, backward, optimizer step."""
    start = time.perf_counter()
    out = module.training_step(batch, 0)
    (out["loss"] if isinstance(out, dict) else out).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def cycling_steps(module: FlipLitModule, optimizer, batches: list) -> Callable[[], float]:
    """A call that times one step on the next of `batches`, going round them."""
    upcoming = cycle(batches)
    return lambda: step_seconds(module, optimizer, next(upcoming))


def alternate(run: dict[str, Callable[[], float]], rounds: int, per_round: int, warmup: int) -> dict:
    """{side: seconds of each timed call of `run[side]`}: `warmup` untimed calls per side, then
    `rounds` rounds of `per_round` calls per side, the sides' order reversed every other round."""
    sides = list(run)
    for side in sides:
        for _ in range(warmup):
            run[side]()
    times: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            times[side] += [run[side]() for _ in range(per_round)]
    return times


def step_bench_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options every step bench shares: batches per round, rounds, warm-up, threads, data, output."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="demo steps per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--data", type=Path, default=Path("data"), help="where FaceShapes is (or is generated)"
    )
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser
