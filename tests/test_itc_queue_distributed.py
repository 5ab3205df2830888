"""loss=itc_queue on 2 gloo ranks: the queue holds every rank's momentum features of the last
Q / (W B) steps, in rank order, and the momentum copy stays the same on every rank. The spawned
ranks import only this file, torch and flip.losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from flip.losses.itc_queue import MomentumItcLoss
from flip.models.outputs import EncoderOutput

D_IN, D = 6, 4


class Towers(nn.Module):
    """A stand-in for FlipModel: linear towers over vectors, unit features, a learnable temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.text = nn.Linear(D_IN, D), nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(
            F.normalize(self.image(images), dim=-1),
            F.normalize(self.text(text), dim=-1),
            self.logit_scale.exp(),
        )


B, Q, STEPS = 3, 12, 7  # the global batch is 6: the queue holds the last 2 steps and wrapped around


def _ranks_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same online model on every rank
    model = Towers()
    loss = MomentumItcLoss(queue_size=Q, momentum=0.9, rank=rank, world_size=world)
    loss.bind(model)
    mine = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        images, text = torch.randn(B, D_IN, generator=gen), torch.randn(B, D_IN, generator=gen)
        encoded = loss.encode_inputs(images, text)
        mine.append((encoded.image_features.clone(), encoded.text_features.clone()))
        loss.loss_from_outputs(model(images, text), encoded).backward()
        with torch.no_grad():  # DDP's step: averaged gradients, the same update on every rank
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p -= 0.5 * p.grad / world
                p.grad = None
        loss.after_optimizer_step(model)
    torch.save({"mine": mine, "state": loss.state_dict()}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_on_two_ranks_the_queue_holds_the_last_global_batches_in_rank_order(tmp_path):
    from .helpers.processes import free_port  # here, not at the top: the ranks need not import it

    mp.spawn(_ranks_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # the global batch of each step: rank 0's momentum features, then rank 1's, as each rank saw them
    steps = [[torch.cat([saved[r]["mine"][s][k] for r in range(2)]) for k in (0, 1)] for s in range(STEPS)]
    expected_image, expected_text = torch.empty(Q, D), torch.empty(Q, D)
    for s in range(STEPS - Q // (2 * B), STEPS):  # the last Q / (W B) steps, at their ring positions
        at = s * 2 * B % Q
        expected_image[at : at + 2 * B], expected_text[at : at + 2 * B] = steps[s]
    for r in range(2):
        state = saved[r]["state"]
        torch.testing.assert_close(state["image_queue"], expected_image, rtol=0, atol=0)
        torch.testing.assert_close(state["text_queue"], expected_text, rtol=0, atol=0)
        assert (int(state["queue_ptr"]), int(state["queue_filled"])) == (STEPS * 2 * B % Q, Q)
    for key, value in saved[0]["state"].items():  # the momentum copy too: the same on both ranks
        assert torch.equal(value, saved[1]["state"][key]), key
