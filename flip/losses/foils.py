"""Attribute foils as extra negatives: each scored against its own image only.

A foil is a caption with one attribute changed (`flip.data.foils`); it is a hard negative
for the image whose caption it came from, and for no other image: to any other image it is
a near-copy of that image's caption, already a negative in the batch. So each image's row of
image->text logits gains one column per foil of its own caption (NegCLIP appends its
negatives as columns for every image; scoring them in their own row keeps what they are for,
costs B x F dot products instead of B x (B x F) and needs no communication: a foil stays on the
rank of its image). Foils are never anchors: the text->image direction is unchanged. A foil
slot that a caption could not fill is masked out (-inf logit, or no SigLIP term).

Under DDP, a loss whose every rank scores the whole global batch (`local_loss=False`) needs
every image's foils, gathered in rank order as the images are; otherwise each rank scores
its own rows with its own foils.

Statements (`data.hard_negatives.form=statement`, `flip.data.foils.statements`) come in the
same slots with a mask [B, groups, values]: each group is led by the statement of what the
caption says and holds the same words for the attribute's other values. Its first slot is a
positive, so statements never join the batch's softmax; they are scored by the choice term
alone (`statement_choice_loss`), and by SigLIP as one positive and several negative pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flip.losses.distributed import gather_features, gather_mask

__all__ = [
    "FoilChoiceSchedule",
    "append_foil_logits",
    "centred_statement_logits",
    "choice_loss",
    "foil_choice_loss",
    "foil_rows",
    "foil_token_similarity",
    "is_statements",
    "pooled_foil_logits",
    "reads_foils",
    "siglip_foil_loss",
    "statement_choice_loss",
    "with_foil_columns",
]

_NEG_INF = float("-inf")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    The gradient of the foils comes out of an einsum in whatever strides it chose; the gloo
    backward of `torch.distributed.nn.all_gather` scatters into buffers made `empty_like` that
    gradient, and a strided buffer receives the values out of place.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def foil_rows(
    rows: torch.Tensor,
    foils: torch.Tensor,
    mask: torch.Tensor,
    *extra: torch.Tensor | None,
    local_loss: bool,
    gather_with_grad: bool,
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor | None, ...]:
    """The image rows a loss scores and the foils (and masks) that go with them.

    On one process, or with `local_loss`, the local ones. Otherwise every rank's, in rank
    order, gathered as the loss gathers its image features; masks ([B, F], or `extra` ones
    such as token masks) are gathered as constants.
    """
    if world_size == 1 or local_loss:
        return (rows, foils, mask, *extra)
    rows, foils = gather_features(
        rows, foils, local_loss=False, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size
    )
    return (
        rows,
        _ContiguousGrad.apply(foils),
        gather_mask(mask, world_size),
        *(None if e is None else gather_mask(e, world_size) for e in extra),
    )


def pooled_foil_logits(
    image_features: torch.Tensor,
    foil_features: torch.Tensor,
    foil_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """[R, F] logits of each image against its own foils ([R, D] and [R, F, D]), -inf where no foil."""
    logits = logit_scale * torch.einsum("rd,rfd->rf", image_features, foil_features)
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits.masked_fill(~foil_mask.bool(), _NEG_INF)


def centred_statement_logits(
    image_features: torch.Tensor, foil_features: torch.Tensor, mask: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """[R, G * V] logits of each image against its statements, each group's statements taken as
    their differences from the group's mean, divided by the group's root-mean-square difference.

    A young text tower reads "who looks sad" and "who looks happy" alike: the group's statements
    are nearly one vector, the choice between them is near chance whatever the image says, and
    its gradient, which runs along their differences, vanishes with them. Centred and rescaled,
    the differences score the image at the scale of the batch's logits from the first step, as
    a classifier's head would. Within a group it is the same order as the raw similarities
    (an affine map of them with a positive slope), so the zero-shot choice reads what the
    term trains. `foil_features` [R, G * V, D], `mask` [R, G, V]; -inf in empty slots.
    """
    rows, groups, values = mask.shape
    texts = foil_features.reshape(rows, groups, values, -1).float()
    valid = mask.to(texts.dtype)[..., None]
    count = valid.sum(dim=2, keepdim=True).clamp_min(1.0)
    centred = (texts - (texts * valid).sum(dim=2, keepdim=True) / count) * valid
    # clamped before the root: an empty group's spread is 0, where the root has no gradient
    spread = (centred.square().sum(dim=(2, 3), keepdim=True) / count).clamp_min(1e-12).sqrt()
    logits = logit_scale * torch.einsum("rd,rgvd->rgv", image_features.float(), centred / spread)
    return logits.masked_fill(~mask.bool(), _NEG_INF).flatten(1)


def append_foil_logits(per_image: torch.Tensor, foil_logits: torch.Tensor) -> torch.Tensor:
    """Image->text logits [R, C] with each row's foil columns after the batch's [R, C + F]: the
    positives' columns (the labels) stay where they were."""
    return torch.cat([per_image, foil_logits.to(per_image.dtype)], dim=1)


@dataclass(frozen=True)
class FoilChoiceSchedule:
    """The foil choice term's weight at each optimizer step: 0 before `start_step`, then rising
    linearly to `weight` over `ramp_steps` (at once when 0).

    A young text tower encodes a caption and its foil almost alike, and choosing between them
    at full weight from the first step competes with the contrastive task the towers have not
    learned yet: starting the term once they align keeps what it adds without slowing that.
    The step is the trainer's (`at_step`), so a resumed run weighs the term as the run it
    continues did.
    """

    weight: float = 0.0
    start_step: int = 0
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, int | float)
            or not self.weight >= 0.0
        ):
            raise ValueError(f"foil_choice_weight must be >= 0 (0: no foil choice term), got {self.weight!r}")
        for name in ("start_step", "ramp_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"foil_choice_{name} must be an integer >= 0 (optimizer steps), got {value!r}"
                )

    def at(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if not self.ramp_steps:
            return float(self.weight)
        return float(self.weight) * min(1.0, (step - self.start_step) / self.ramp_steps)


def foil_choice_loss(logits: torch.Tensor, labels: torch.Tensor, num_foils: int) -> torch.Tensor:
    """Each image picking its own caption among that caption and its foils: the cross-entropy
    over [positive, own foils] of every row that has a foil, summed and divided by all rows.

    In the batch's softmax a foil is one column among B + F, and while the text tower still
    reads "looking sad" and "looking happy" alike, the foil and the positive pull the image
    almost equally: the attribute the foil changes gets little gradient. Weighted on its own
    (`foil_choice_weight` of ClipLoss and FilipLoss), the choice between near-identical captions
    is what the term trains. Divided by all rows, not by the rows with a foil, so that ranks
    holding different numbers of foils still average to the global batch's loss: a row whose
    foil slots are all -inf chooses its positive with certainty and adds exactly 0, so the
    plain mean over rows is that sum, with no selection of rows (nor a host sync to count them).

    `logits` [R, C + F]: image->text logits with each row's foil columns last (-inf where
    none), `labels` [R]: each row's positive column.
    """
    choices = torch.cat([logits.gather(1, labels[:, None]), logits[:, logits.shape[1] - num_foils :]], dim=1)
    return F.cross_entropy(choices, labels.new_zeros(labels.shape[0]))


def is_statements(foil_mask: torch.Tensor | None) -> bool:
    """Whether foil slots hold statement groups: their mask is [B, groups, values]."""
    return foil_mask is not None and foil_mask.dim() == 3


def reads_foils(foil_mask: torch.Tensor | None, choice_weight: float) -> bool:
    """Whether a clip or filip term reads its foils at a step whose choice weight is
    `choice_weight`: caption foils always (extra negatives); statements only through the choice
    term. Statements never join the batch's softmax, so scoring them while the choice is off
    (FILIP: every statement's tokens against its image's) is work for a loss and gradients that
    are the same without it."""
    return not is_statements(foil_mask) or choice_weight > 0


def statement_choice_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each image choosing, in each of its statement groups, the statement of what its caption
    says: the cross-entropy over the group's logits (the positive first), summed over the groups
    present and divided by all rows, as `foil_choice_loss` is (ranks holding different numbers
    of groups average to the global batch's loss).

    `logits` [R, G * V]: each image against its own statements, -inf in empty slots; `mask`
    [R, G, V].
    """
    rows, groups, values = mask.shape
    logits = logits.reshape(rows * groups, values).float()
    present = mask.reshape(rows * groups, values)[:, 0].bool()
    # an absent group's logits are all -inf: zeros keep its (unused) cross-entropy finite
    logits = logits.masked_fill(~present[:, None], 0.0)
    chosen = F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long), reduction="none")
    return (chosen * present).sum() / rows


def with_foil_columns(per_image: torch.Tensor, foil_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The batch's image->text logits with each row's foil columns (`append_foil_logits`); with
    statement groups, as they were: a group leads with a positive, which is no negative."""
    return per_image if is_statements(mask) else append_foil_logits(per_image, foil_logits)


def choice_loss(
    per_image: torch.Tensor, labels: torch.Tensor, foil_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The choice term of either form: each image's caption among its foils (`foil_choice_loss`,
    on `with_foil_columns`' logits) or its statement in each group (`statement_choice_loss`)."""
    if is_statements(mask):
        return statement_choice_loss(foil_logits, mask)
    return foil_choice_loss(per_image, labels, foil_logits.shape[1])


def siglip_foil_loss(
    image_features: torch.Tensor,
    foil_features: torch.Tensor,
    foil_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
) -> torch.Tensor:
    """SigLIP's negative-pair term for every (image, own foil) pair, divided by the local batch
    size as its other terms are. Statement groups (mask [B, G, V]): the first of each group is a
    positive pair, the others negative ones."""
    flat = foil_mask.flatten(1)
    logits = pooled_foil_logits(image_features, foil_features, torch.ones_like(flat), logit_scale, logit_bias)
    sign = -torch.ones_like(logits)
    if is_statements(foil_mask):
        sign = sign.view(foil_mask.shape)
        sign[:, :, 0] = 1.0
        sign = sign.flatten(1)
    terms = -F.logsigmoid(sign * logits) * flat.to(logits.dtype)
    return terms.sum() / image_features.shape[0]


def foil_token_similarity(
    image_tokens: torch.Tensor,
    image_mask: torch.Tensor | None,
    foil_tokens: torch.Tensor,
    foil_token_mask: torch.Tensor,
) -> torch.Tensor:
    """FILIP's image->text similarity s_I of each image with its own foils: [R, F].

    Image tokens [R, Ni, D] (mask [R, Ni] or None), foil tokens [R, F, Nt, D] (mask [R, F, Nt]):
    the mean over the image's valid tokens of each one's best similarity with the foil's
    valid tokens, as `flip.losses.filip.filip_similarity` computes it for the batch's pairs.
    """
    sim = torch.einsum("rkd,rfnd->rfkn", image_tokens, foil_tokens)
    sim = sim.masked_fill(~foil_token_mask.bool()[:, :, None, :], _NEG_INF)
    best = sim.amax(dim=3)
    best = best.masked_fill(best.isneginf(), 0.0)  # a foil with no valid token scores 0, not -inf
    if image_mask is None:
        return best.mean(dim=2)
    valid = image_mask.bool()[:, None, :]
    return (best * valid).sum(dim=2) / valid.sum(dim=2).clamp_min(1)
