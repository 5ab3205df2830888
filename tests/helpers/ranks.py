"""A loss on 2 gloo ranks against one process on the global batch: the check of every loss with
attribute foils or statements. A test module names its cases (`CASES`: name -> (make(rank,
world), siglip)), its rows per rank (`B`) and `loss_and_grads(loss, siglip, n, rows)`; each rank
computes its rows' loss and gradients, averaged as DDP averages them."""

from __future__ import annotations

import importlib
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .processes import free_port


def _rank(rank: int, world: int, port: int, path: str, module_name: str) -> None:
    cases = importlib.import_module(module_name)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    rows, results = slice(rank * cases.B, (rank + 1) * cases.B), {}
    for name, (make, siglip) in cases.CASES.items():
        loss, grads = cases.loss_and_grads(make(rank, world), siglip, world * cases.B, rows)
        for t in (loss, *grads.values()):  # what DDP does to gradients
            dist.all_reduce(t)
            t /= world
        results[name] = {"loss": loss, "grads": grads}
    if rank == 0:
        torch.save(results, path)
    dist.destroy_process_group()


def assert_two_ranks_equal_one_process(module_name: str, tmp_path: Path) -> None:
    """Every case of `module_name` on 2 gloo ranks gives the loss and gradients of one process."""
    cases = importlib.import_module(module_name)
    path = str(Path(tmp_path) / "results.pt")
    mp.spawn(_rank, args=(2, free_port(), path, module_name), nprocs=2, join=True)
    got = torch.load(path)
    for name, (make, siglip) in cases.CASES.items():
        loss, grads = cases.loss_and_grads(make(0, 1), siglip, 2 * cases.B)
        assert got[name]["loss"].item() == pytest.approx(loss.item(), abs=1e-5), name
        for key, grad in grads.items():
            torch.testing.assert_close(got[name]["grads"][key], grad, atol=1e-4, rtol=0, msg=f"{name}: {key}")
