"""Image-text matching (ITM) on hard negatives: the second objective of ALBEF, BLIP and FLIP-Base.

For every image, one negative caption is drawn from the softmax of its contrastive similarities
to every caption of the (gathered) batch, with the image's positives removed; for every caption,
likewise one negative image. The model's fusion encoder and 2-way head (`FlipModel.itm_logits`)
then classify the B positive pairs and the 2B negative pairs; the loss is their mean cross
entropy. The negatives that look most like a match are the likeliest, so the head learns what the
pooled embeddings confuse: the one attribute that differs.

"Positive" is any caption that is the image's own: its own column, any column with the same
caption token ids (the same caption twice in a batch: a duplicated sample, or two faces whose
captions coincide), and, when sample keys are given, any column of the same key (one image with
several captions). Drawing one of those as a "non-match" would teach the head to reject true pairs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flip.losses.clip import check_rank
from flip.losses.distributed import all_gather_with_grad
from flip.models.outputs import EncoderOutput


def positive_mask(
    local_ids: torch.Tensor,
    all_ids: torch.Tensor,
    rank: int = 0,
    local_keys: torch.Tensor | None = None,
    all_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, N] True where column j of the gathered batch (rank order) is a positive of local row i.

    Row i's own pair is column rank * B + i; any column whose caption token ids equal row i's is
    positive too, and, with keys, any column of the same sample key. The relation is symmetric,
    so the same mask serves image->text and text->image.
    """
    batch = local_ids.shape[0]
    mask = (local_ids[:, None, :] == all_ids[None, :, :]).all(dim=-1)
    own = torch.arange(batch, device=mask.device) + rank * batch
    mask[torch.arange(batch, device=mask.device), own] = True
    if local_keys is not None:
        mask |= local_keys[:, None] == all_keys[None, :]
    return mask


def negative_distribution(similarity: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Rows of softmax(similarity) with the positives removed and renormalised (the masked softmax),
    computed as a softmax over the negatives' logits so that no negative underflows to zero;
    a row with no negative is all zeros."""
    logits = similarity.masked_fill(positives, float("-inf"))
    has_negative = (~positives).any(dim=1, keepdim=True)
    return torch.where(has_negative, logits.softmax(dim=1), torch.zeros_like(logits))


def sample_negatives(
    weights: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column per row drawn from `weights` (rows of `negative_distribution`): (index [B],
    valid [B]); a row without any negative is not valid, and its index is meaningless."""
    valid = weights.sum(dim=1) > 0
    safe = torch.where(valid[:, None], weights, torch.ones_like(weights))
    return torch.multinomial(safe, 1, generator=generator).squeeze(1), valid


def _gather(tensor: torch.Tensor, world_size: int, with_grad: bool) -> torch.Tensor:
    if world_size == 1:
        return tensor
    if with_grad:
        return torch.cat(all_gather_with_grad(tensor.contiguous()))
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


class ItmLoss(nn.Module):
    """Cross entropy of the model's ITM head on (positive, hard negative caption, hard negative image)
    triples, hard negatives mined from the whole gathered batch.

    Under DDP each rank draws negatives for its own B images and B captions among all ranks'
    captions and images (gathered in rank order, the hidden states with gradient, so the fusion's
    gradient reaches the rank that encoded a negative, as BLIP's retrieval fine-tuning does).
    The similarities are the contrastive ones, `logit_scale * image @ text`, of the online model.
    The fusion and head are the model's (`model.fusion`): `bind(model)` finds them.
    """

    requires_tokens: ClassVar[bool] = True  # the hidden token states come with the token features

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        check_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.generator: torch.Generator | None = None  # tests fix the draws; None: torch's global RNG

    def bind(self, model: nn.Module) -> None:
        """Keep the model whose fusion scores the pairs (unregistered: its weights are the model's)."""
        if getattr(model, "fusion", None) is None:
            raise ValueError(
                "the ITM loss needs a model with an image-text matching fusion: set model.fusion "
                "(e.g. model.fusion={layers: 2, heads: 2}; loss=clip_itm and loss=itc_queue_itm set it)"
            )
        self.__dict__["_model"] = model

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        image_hidden: torch.Tensor,
        text_hidden: torch.Tensor,
        text_ids: torch.Tensor,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        model = self.__dict__.get("_model")
        if model is None:
            raise RuntimeError("ItmLoss has no model: call bind(model) first (FlipLitModule does)")
        batch = image_features.shape[0]
        with torch.no_grad():
            all_image = _gather(image_features, self.world_size, with_grad=False)
            all_text = _gather(text_features, self.world_size, with_grad=False)
            all_ids = _gather(text_ids, self.world_size, with_grad=False)
            all_keys = None if keys is None else _gather(keys, self.world_size, with_grad=False)
            positives = positive_mask(text_ids, all_ids, self.rank, keys, all_keys)
            scale = logit_scale.detach()
            text_for_image, text_valid = sample_negatives(
                negative_distribution(scale * image_features @ all_text.T, positives), self.generator
            )
            image_for_text, image_valid = sample_negatives(
                negative_distribution(scale * text_features @ all_image.T, positives), self.generator
            )
        all_image_hidden = _gather(image_hidden, self.world_size, with_grad=True)
        all_text_hidden = _gather(text_hidden, self.world_size, with_grad=True)
        text_for_image, image_for_text = text_for_image[text_valid], image_for_text[image_valid]
        images = torch.cat([image_hidden, image_hidden[text_valid], all_image_hidden[image_for_text]])
        texts = torch.cat([text_hidden, all_text_hidden[text_for_image], text_hidden[image_valid]])
        ids = torch.cat([text_ids, all_ids[text_for_image], text_ids[image_valid]])
        labels = torch.zeros(len(ids), dtype=torch.long, device=ids.device)
        labels[:batch] = 1
        return F.cross_entropy(model.itm_logits(images, texts, ids), labels)

    def loss_from_outputs(self, outputs: EncoderOutput) -> torch.Tensor:
        if outputs.image_hidden is None or outputs.text_hidden is None or outputs.text_ids is None:
            raise ValueError(
                "the ITM loss needs the model's hidden token states: a model with model.fusion, "
                "called with return_tokens=True (the training module asks for them)"
            )
        return self(
            outputs.image_features,
            outputs.text_features,
            outputs.logit_scale,
            outputs.image_hidden,
            outputs.text_hidden,
            outputs.text_ids,
        )
