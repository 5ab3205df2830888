"""Cross-rank exchange of features for contrastive losses.

A contrastive loss wants every sample of the global batch as a negative, but each rank only
encodes its own shard. These helpers bring the other shards in, either with autograd (the
gradient of a gathered copy is sent back to the rank that produced it) or without (the
other shards are constants and only the local copy carries gradient).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn


def _quiet(collective):
    """Recent torch deprecates torch.distributed.nn's collectives in favour of functional
    collectives whose backward needs reduce-scatter, which gloo (CPU) lacks; these still work
    on every backend (open_clip uses them too), so they are kept and the warning silenced."""

    def call(tensor: torch.Tensor):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"torch\.distributed\.nn\.functional", FutureWarning)
            return collective(tensor)

    return call


all_gather_with_grad = _quiet(torch.distributed.nn.all_gather)
all_reduce_with_grad = _quiet(torch.distributed.nn.all_reduce)


def gather_features(
    *features: torch.Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, ...]:
    """Concatenate every rank's `features` along dim 0, rank order, for each tensor given.

    With `gather_with_grad`, torch.distributed.nn.all_gather sums the gradients of all ranks'
    copies back into the owner: DDP's averaging then yields the exact global-batch gradient.
    Without it the gathered copies are constants; unless `local_loss`, the local shard is put
    back in place so the local features still receive the (whole) gradient of their own rows
    and columns. With `local_loss` the local features enter the logits directly instead.
    """
    if gather_with_grad:
        return tuple(torch.cat(all_gather_with_grad(f.contiguous()), dim=0) for f in features)
    gathered = []
    for f in features:
        parts = [torch.empty_like(f) for _ in range(world_size)]
        dist.all_gather(parts, f.detach().contiguous())
        if not local_loss:
            parts[rank] = f
        gathered.append(torch.cat(parts, dim=0))
    return tuple(gathered)


def gather_mask(mask: torch.Tensor, world_size: int) -> torch.Tensor:
    """All-gather a boolean mask (as uint8: not every backend reduces or gathers bool)."""
    parts = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(parts, mask.to(torch.uint8).contiguous())
    return torch.cat(parts, dim=0).bool()


def _exchange(recvs: list[tuple[int, torch.Tensor]], sends: list[tuple[int, torch.Tensor]]) -> None:
    """Post all receives and sends at once: ranks waiting on each other in a ring can't deadlock."""
    p2p = [dist.P2POp(dist.isend, t.contiguous(), peer) for peer, t in sends]
    p2p += [dist.P2POp(dist.irecv, t, peer) for peer, t in recvs]
    for req in dist.batch_isend_irecv(p2p):
        req.wait()


class NeighbourExchange(torch.autograd.Function):
    """Send `tensor` to `to_rank`, receive one from `from_rank`; the gradient travels back."""

    @staticmethod
    def forward(ctx, from_rank: int, to_rank: int, tensor: torch.Tensor) -> torch.Tensor:
        ctx.from_rank, ctx.to_rank = from_rank, to_rank
        received = torch.empty_like(tensor)
        _exchange([(from_rank, received)], [(to_rank, tensor)])
        return received

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, NeighbourExchange.apply(ctx.to_rank, ctx.from_rank, grad)


class NeighbourExchangeBidir(torch.autograd.Function):
    """Exchange with both ring neighbours at once; returns (from the right, from the left)."""

    @staticmethod
    def forward(ctx, left_rank: int, right_rank: int, to_left: torch.Tensor, to_right: torch.Tensor):
        ctx.left_rank, ctx.right_rank = left_rank, right_rank
        from_right, from_left = torch.empty_like(to_left), torch.empty_like(to_right)
        _exchange(
            [(right_rank, from_right), (left_rank, from_left)], [(left_rank, to_left), (right_rank, to_right)]
        )
        return from_right, from_left

    @staticmethod
    def backward(ctx, grad_from_right: torch.Tensor, grad_from_left: torch.Tensor):
        # the gradient of what came from the right goes back to the right: swap the roles
        back = NeighbourExchangeBidir.apply(ctx.right_rank, ctx.left_rank, grad_from_right, grad_from_left)
        return None, None, *back


def neighbour_exchange(from_rank: int, to_rank: int, tensor: torch.Tensor) -> torch.Tensor:
    return NeighbourExchange.apply(from_rank, to_rank, tensor)


def neighbour_exchange_bidir(
    left_rank: int, right_rank: int, to_left: torch.Tensor, to_right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return NeighbourExchangeBidir.apply(left_rank, right_rank, to_left, to_right)
