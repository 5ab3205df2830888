"""A real 2-process gloo run: every loss, DDP-style averaged over ranks of B samples each, gives
the loss and the parameter gradients of one process on the 2B batch. ClipLoss and SigLipLoss
also match open_clip rank by rank. One spawn runs every case; a second one, with 4 ranks, runs
the SigLIP ring exchanges, which 2 ranks exercise only partly (bidir's two-sided exchange, its
passing-on and shift's further hops need more ranks)."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import open_clip.loss as oc
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from flip.losses import ClipLoss, CombinedLoss, FilipLoss, SigLipLoss, build_loss
from flip.models.outputs import EncoderOutput

from .helpers import free_port

B, NI, NT, IN, D = 4, 5, 7, 12, 8
LOSS_CONF = Path(__file__).resolve().parents[1] / "conf" / "loss"


def _clip(**kw):
    return lambda rank, world: ClipLoss(rank=rank, world_size=world, **kw)


def _open_clip(cls, **kw):
    return lambda rank, world: cls(rank=rank, world_size=world, **kw)


# name: (our loss, open_clip's or None, siglip-style logit params, how DDP grads relate to 1 process)
#   "mean": DDP's average is the 2B gradient. "towers_sum": without gather_with_grad and without
#   local_loss only each rank's own features get gradient, so the towers' average is 1/W of it
#   (open_clip behaves so). "loss_only": local_loss without gather_with_grad drops the gradient
#   through other ranks' rows: a partial gradient, checked against open_clip only.
CASES = {
    "clip-local-gradgather": (_clip(local_loss=True, gather_with_grad=True), True, False, "mean"),
    "clip-global-gradgather": (_clip(gather_with_grad=True), True, False, "mean"),
    "clip-global": (_clip(), True, False, "towers_sum"),
    "clip-local": (_clip(local_loss=True), True, False, "loss_only"),
    **{
        f"siglip-{impl}": (
            lambda rank, world, impl=impl: SigLipLoss(rank=rank, world_size=world, dist_impl=impl),
            True,
            True,
            "mean",
        )
        for impl in ("bidir", "shift", "reduce", "gather")
    },
    "filip-local-gradgather": (
        lambda rank, world: FilipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world, chunk_size=3
        ),
        False,
        False,
        "mean",
    ),
    "filip-global-gradgather-topk": (
        lambda rank, world: FilipLoss(gather_with_grad=True, rank=rank, world_size=world, topk_fraction=0.5),
        False,
        False,
        "mean",
    ),
    "clip_filip-yaml": (
        lambda rank, world: build_loss(
            OmegaConf.load(LOSS_CONF / "clip_filip.yaml"), rank=rank, world_size=world
        ),
        False,
        False,
        "mean",
    ),
}


def open_clip_loss(name: str, rank: int, world: int):
    kw = {"local_loss": "local" in name, "gather_with_grad": "gradgather" in name}
    if name.startswith("siglip"):
        return oc.SigLipLoss(rank=rank, world_size=world, dist_impl=name.split("-")[1])
    return oc.ClipLoss(rank=rank, world_size=world, **kw)


class Towers(nn.Module):
    """Linear image and text towers with token outputs, plus the temperature (and SigLIP bias)."""

    def __init__(self, siglip: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.image, self.text = nn.Linear(IN, D), nn.Linear(IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0) if siglip else math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if siglip else None

    def forward(self, images, texts, mask) -> EncoderOutput:
        img_tok, txt_tok = F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)
        m = mask[..., None].float()
        return EncoderOutput(
            F.normalize(img_tok.mean(1), dim=-1),
            F.normalize((txt_tok * m).sum(1) / m.sum(1), dim=-1),
            self.logit_scale.exp(),
            self.logit_bias,
            img_tok,
            txt_tok,
            mask,
        )


def batch(world: int, rows: slice = slice(None)):
    g = torch.Generator().manual_seed(7)
    n = world * B
    images, texts = torch.randn(n, NI, IN, generator=g), torch.randn(n, NT, IN, generator=g)
    mask = torch.arange(NT)[None] < torch.randint(2, NT + 1, (n,), generator=g)[:, None]
    return images[rows], texts[rows], mask[rows]


def loss_and_grads(loss_fn, siglip: bool, world: int, rows: slice = slice(None)):
    model = Towers(siglip)
    out = model(*batch(world, rows))
    if isinstance(loss_fn, CombinedLoss):
        loss = loss_fn(out)["loss"]
    elif hasattr(loss_fn, "loss_from_outputs"):
        loss = loss_fn.loss_from_outputs(out)
    else:  # open_clip's signature
        loss = loss_fn(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, names: list[str], port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    rows, results = slice(rank * B, (rank + 1) * B), {}
    for name in names:
        make, has_open_clip, siglip, _ = CASES[name]
        loss, grads = loss_and_grads(make(rank, world), siglip, world, rows)
        parity = torch.zeros(2)  # max |ours - open_clip| of this rank's loss and local gradients
        if has_open_clip:
            theirs, their_grads = loss_and_grads(open_clip_loss(name, rank, world), siglip, world, rows)
            parity[0] = (loss - theirs).abs()
            parity[1] = max((grads[n] - their_grads[n]).abs().max() for n in grads)
        for t in (loss, *grads.values()):  # what DDP does to gradients; the loss is logged the same way
            dist.all_reduce(t)
            t /= world
        dist.all_reduce(parity, op=dist.ReduceOp.MAX)
        results[name] = {"loss": loss, "grads": grads, "parity": parity}
    if rank == 0:
        torch.save(results, path)
    dist.destroy_process_group()


def spawn(world: int, names: list[str], directory: Path) -> dict:
    port = free_port()
    path = str(directory / "results.pt")
    mp.spawn(_worker, args=(world, names, port, path), nprocs=world, join=True)
    return torch.load(path)


RING_CASES = ["siglip-bidir", "siglip-shift"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn(2, list(CASES), tmp_path_factory.mktemp("ddp2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return spawn(4, RING_CASES, tmp_path_factory.mktemp("ddp4"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks, name):
    check(two_ranks[name], name, world=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", RING_CASES)
def test_four_rank_ring_exchanges_equal_one_process(four_ranks, name):
    check(four_ranks[name], name, world=4)


def check(got: dict, name: str, world: int) -> None:
    make, has_open_clip, siglip, relation = CASES[name]
    loss, grads = loss_and_grads(make(0, 1), siglip, world)
    assert abs(got["loss"].item() - loss.item()) <= 1e-5, (got["loss"].item(), loss.item())
    if has_open_clip:
        assert got["parity"][0] <= 1e-5 and got["parity"][1] <= 1e-5, got["parity"]
    if relation == "loss_only":
        return
    for n, g in grads.items():
        ddp = got["grads"][n] * (world if relation == "towers_sum" and n != "logit_scale" else 1)
        torch.testing.assert_close(ddp, g, atol=1e-4, rtol=0, msg=f"{name}: gradient of {n}")
        assert g.abs().max() > 1e-4  # a real gradient, not two zeros
