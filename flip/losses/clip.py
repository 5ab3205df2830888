"""CLIP's symmetric InfoNCE, with open_clip's ClipLoss semantics in every distributed mode."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flip.losses.distributed import gather_features
from flip.losses.foils import (
    FoilChoiceSchedule,
    centred_statement_logits,
    choice_loss,
    foil_rows,
    is_statements,
    pooled_foil_logits,
    reads_foils,
    with_foil_columns,
)
from flip.models.outputs import EncoderOutput


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def contrastive_labels(
    num_logits: int, device: torch.device, rank: int = 0, world_size: int = 1, local_loss: bool = False
) -> torch.Tensor:
    """Column of each row's positive.

    With `local_loss` the rows are this rank's B_local samples while the columns are the whole
    gathered batch in rank order, so row i's own pair sits at column rank * B_local + i.
    """
    labels = torch.arange(num_logits, device=device, dtype=torch.long)
    return labels + num_logits * rank if world_size > 1 and local_loss else labels


def symmetric_cross_entropy(
    logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class ClipLoss(nn.Module):
    """InfoNCE over pooled features, numerically open_clip's `ClipLoss`.

    `local_loss` computes B_local x B_global logits per rank instead of every rank repeating
    the full B_global x B_global: the same global loss once averaged over ranks, W times less
    work. `gather_with_grad` makes DDP-averaged gradients those of the global batch; without it
    only local features get gradient (open_clip's default, scaled by 1/W for the towers, and
    partial in combination with `local_loss`).

    `foil_choice_weight` adds, with attribute foils, the image's choice between its caption and
    that caption's foils as a term of its own (`flip.losses.foils.foil_choice_loss`), from
    `foil_choice_start_step` on, ramped in over `foil_choice_ramp_steps` (`FoilChoiceSchedule`).
    With statements, `foil_choice_centred` scores each group by its statements' differences
    from their mean (`flip.losses.foils.centred_statement_logits`).
    """

    requires_tokens: ClassVar[bool] = False
    uses_foils: ClassVar[bool] = True  # data.hard_negatives: foils are extra negatives here

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        foil_choice_weight: float = 0.0,
        foil_choice_start_step: int = 0,
        foil_choice_ramp_steps: int = 0,
        foil_choice_centred: bool = False,
    ) -> None:
        super().__init__()
        check_rank(rank, world_size)
        self.foil_choice = FoilChoiceSchedule(
            foil_choice_weight, foil_choice_start_step, foil_choice_ramp_steps
        )
        if not isinstance(foil_choice_centred, bool):
            raise ValueError(f"foil_choice_centred must be true or false, got {foil_choice_centred!r}")
        self.foil_choice_centred = foil_choice_centred
        self.step = 0  # the trainer's optimizer step (`at_step`): the foil choice weight follows it
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size
        self._labels: dict[tuple[torch.device, int], torch.Tensor] = {}

    def at_step(self, step: int) -> None:
        """Called by the training module before each training step's loss (the foil choice schedule)."""
        self.step = step

    def get_ground_truth(self, device: torch.device, num_logits: int) -> torch.Tensor:
        key = (device, num_logits)
        if key in self._labels:
            return self._labels[key]
        labels = contrastive_labels(num_logits, device, self.rank, self.world_size, self.local_loss)
        if self.cache_labels:
            self._labels[key] = labels
        return labels

    def get_logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world_size > 1:
            all_image, all_text = gather_features(
                image_features,
                text_features,
                local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad,
                rank=self.rank,
                world_size=self.world_size,
            )
            if self.local_loss:
                per_image, per_text = (
                    logit_scale * image_features @ all_text.T,
                    logit_scale * text_features @ all_image.T,
                )
            else:
                per_image = logit_scale * all_image @ all_text.T
                per_text = per_image.T
        else:
            per_image, per_text = (
                logit_scale * image_features @ text_features.T,
                logit_scale * text_features @ image_features.T,
            )
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text

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
        extra negatives in their own image's row only (`flip.losses.foils`). With `foil_mask`
        [B, G, V] they are statement groups, scored by the choice term alone."""
        per_image, per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        weight = self.foil_choice.at(self.step)
        if foil_features is not None and not reads_foils(foil_mask, weight):
            foil_features = None
        if foil_features is not None:
            rows, foils, mask = foil_rows(
                image_features,
                foil_features,
                foil_mask,
                local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad,
                rank=self.rank,
                world_size=self.world_size,
            )
            if self.foil_choice_centred and is_statements(mask):
                # the bias is the same for a group's every statement: its choice does not see it
                foil_logits = centred_statement_logits(rows, foils, mask, logit_scale)
            else:
                foil_logits = pooled_foil_logits(rows, foils, mask.flatten(1), logit_scale, logit_bias)
            per_image = with_foil_columns(per_image, foil_logits, mask)
        labels = self.get_ground_truth(per_image.device, per_image.shape[0])
        loss = symmetric_cross_entropy(per_image, per_text, labels)
        if foil_features is not None and weight:
            loss = loss + weight * choice_loss(per_image, labels, foil_logits, mask)
        return {"contrastive_loss": loss} if output_dict else loss

    def loss_from_outputs(self, outputs: EncoderOutput) -> torch.Tensor:
        return self(
            outputs.image_features,
            outputs.text_features,
            outputs.logit_scale,
            outputs.logit_bias,
            foil_features=outputs.foil_text_features,
            foil_mask=outputs.foil_mask,
        )
