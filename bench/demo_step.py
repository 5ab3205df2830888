"""FLIP's training step on the demo's batches, outside a trainer: what the step benches time.

The step is the module's `training_step` with the recipe's loss, backward and the optimizer's
step, on FaceShapes batches from the recipe's own loader; nothing is logged (no trainer to log to).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from itertools import cycle, islice
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn.attention import sdpa_kernel

from bench.run_config import run_config
from flip.training.attention import check_attention_kernels
from flip.training.module import FlipLitModule, module_options
from flip.training.optim import build_optimizer

PRECISIONS = ("32-true", "bf16-mixed")


def build(overrides: list[str], work: Path, data: Path):
    """(config, module, optimizer) for the recipe `overrides`, from seed 0's initial weights."""
    cfg = run_config("train", overrides, work, data)
    torch.manual_seed(0)
    module = FlipLitModule(cfg.model, cfg.loss, cfg.optim, **module_options(cfg))
    # training_step asks the trainer for the world size; the optimizer needs no schedule here
    module.trainer = L.Trainer(max_steps=cfg.trainer.max_steps, logger=False, enable_checkpointing=False)
    # the trainer's step is the run's last: a step whose every schedule is past its ramp, as most
    # of a run's are. At step 0 the foil choice term (ramped from 0) is off, and statements,
    # which only that term reads, would be made and encoded but never scored
    _set_trainer_step(module.trainer, cfg.trainer.max_steps - 1)
    optimizer = build_optimizer(module.model, cfg.optim)
    module.train()
    module.log = module.log_dict = lambda *args, **kwargs: None
    return cfg, module, optimizer


def _set_trainer_step(trainer: L.Trainer, step: int) -> None:
    """`trainer.global_step` = `step`, as a trainer's loop counts it, without running the loop."""
    trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step
    if trainer.global_step != step:
        raise RuntimeError(
            f"Lightning {L.__version__} no longer counts its step where the step benches set it"
        )


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


@contextmanager
def trainer_precision(cfg, precision: str) -> Iterator[None]:
    """The step in `precision` as the trainer runs it on a CPU: float32 (32-true), or the forward
    under bfloat16 autocast (bf16-mixed) with the recipe's attention kernels for it."""
    if precision == "32-true":
        yield
        return
    kernels = check_attention_kernels(
        OmegaConf.to_container(cfg.attention_kernels) if cfg.attention_kernels else None
    )
    with ExitStack() as held:
        held.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        if precision in kernels:
            held.enter_context(sdpa_kernel(kernels[precision]))
        yield


def step_bench_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options every step bench shares: batches per round, rounds, warm-up, threads, data, output."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="demo steps per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="32-true",
        help="the trainer's precision to time the step in",
    )
    parser.add_argument(
        "--data", type=Path, default=Path("data"), help="where FaceShapes is (or is generated)"
    )
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser
