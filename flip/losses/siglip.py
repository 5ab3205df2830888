"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023), numerically open_clip's `SigLipLoss`.

Every (image, text) pair is an independent binary problem, so no softmax needs the whole
global batch at once: each rank scores its images against its own texts (positives on the
diagonal) and then against every other rank's texts (negatives only), which can arrive one
shard at a time from ring neighbours instead of through one all-gather.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flip.losses.clip import check_rank
from flip.losses.distributed import (
    all_gather_with_grad,
    all_reduce_with_grad,
    neighbour_exchange,
    neighbour_exchange_bidir,
)
from flip.losses.foils import siglip_foil_loss
from flip.models.outputs import EncoderOutput

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class SigLipLoss(nn.Module):
    """Sigmoid loss summed over all pairs of the global batch, divided by the local batch size.

    Averaged over ranks (as DDP averages gradients) this is the single-process loss of the
    global batch. `dist_impl` only chooses how other ranks' texts travel: "bidir" (both ring
    neighbours per step, W/2 steps), "shift" (one neighbour, W-1 steps), "reduce" (one masked
    all-reduce per rank) or "gather" (one all-gather). All four give the same value and gradient.
    The model owns logit scale and bias; SigLIP initialises them at t' = log 10 and b = -10.
    """

    requires_tokens: ClassVar[bool] = False
    uses_foils: ClassVar[bool] = True  # data.hard_negatives: foils are extra negatives here
    # form=statement: each statement is a pair of its own (positive or negative), no choice term needed
    scores_statements: ClassVar[bool] = True

    def __init__(
        self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str = "bidir"
    ) -> None:
        super().__init__()
        check_rank(rank, world_size)
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"unknown SigLipLoss dist_impl {dist_impl!r}; accepted: {', '.join(DIST_IMPLS)}")
        self.cache_labels, self.rank, self.world_size, self.dist_impl = (
            cache_labels,
            rank,
            world_size,
            dist_impl,
        )
        self._labels: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}

    def get_ground_truth(self, device: torch.device, dtype: torch.dtype, num_logits: int) -> torch.Tensor:
        """+1 on the diagonal (own pair), -1 elsewhere: the sign that turns every pair into log σ(±z)."""
        key = (device, dtype, num_logits)
        if key in self._labels:
            return self._labels[key]
        labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) - 1
        if self.cache_labels:
            self._labels[key] = labels
        return labels

    def _loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        negative_only: bool = False,
    ) -> torch.Tensor:
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + logit_bias
        n = image_features.shape[0]
        sign = (
            -1.0 if negative_only else self.get_ground_truth(image_features.device, image_features.dtype, n)
        )
        return -F.logsigmoid(sign * logits).sum() / n

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
        foil_features: torch.Tensor | None = None,
        foil_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """`foil_features` [B, F, D] (masked by `foil_mask` [B, F]): attribute foils of each caption,
        one more negative pair each with its own image (`flip.losses.foils`); with `foil_mask`
        [B, G, V], statement groups: a positive pair for each group's first, negative for the rest."""
        loss = self._loss(image_features, text_features, logit_scale, logit_bias)
        if self.world_size > 1:
            for term in self._negatives(image_features, text_features, logit_scale, logit_bias):
                loss = loss + term  # open_clip's summation order, for bitwise-close values
        if foil_features is not None:
            loss = loss + siglip_foil_loss(image_features, foil_features, foil_mask, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _negatives(self, image_features, text_features, logit_scale, logit_bias) -> list[torch.Tensor]:
        """Negative-only terms against every other rank's texts, in open_clip's order."""

        def neg(text: torch.Tensor) -> torch.Tensor:
            return self._loss(image_features, text, logit_scale, logit_bias, negative_only=True)

        rank, world = self.rank, self.world_size
        right, left = (rank + 1) % world, (rank - 1) % world
        terms = []
        if self.dist_impl == "bidir":
            to_left = to_right = text_features
            steps, remainder = divmod(world - 1, 2)
            for _ in range(steps):
                from_right, from_left = neighbour_exchange_bidir(left, right, to_left, to_right)
                terms += [neg(from_right), neg(from_left)]
                to_left, to_right = from_right, from_left  # keep passing each shard the way it travels
            if remainder:
                terms.append(neg(neighbour_exchange(left, right, to_right)))
        elif self.dist_impl == "shift":
            to_right = text_features
            for _ in range(world - 1):
                to_right = neighbour_exchange(left, right, to_right)
                terms.append(neg(to_right))
        elif self.dist_impl == "reduce":
            for i in range(world):
                text = all_reduce_with_grad(text_features * (rank == i))
                # keep rank i's own term in the graph (times 0): the all-reduce's backward is a
                # collective too, and every rank has to take part in it
                terms.append(float(i != rank) * neg(text))
        else:
            all_text = all_gather_with_grad(text_features.contiguous())
            terms += [neg(text) for i, text in enumerate(all_text) if i != rank]
        return terms

    def loss_from_outputs(self, outputs: EncoderOutput) -> torch.Tensor:
        return self(
            outputs.image_features,
            outputs.text_features,
            outputs.logit_scale,
            outputs.logit_bias,
            foil_features=outputs.foil_text_features,
            foil_mask=outputs.foil_mask,
        )
