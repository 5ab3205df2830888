"""Heads a fine-tuned image tower feeds, and the features they read from it.

A head declares what it reads (`blocks`): none for a head on the pooled embedding (what
`encode_image` returns), or 1-based block numbers for a dense head that reads feature maps of
several depths, as FaRL's FPN/UPer head reads blocks 4, 6, 8 and 12 of a ViT-B/16. Both come
from one pass of the tower (open_clip's `forward_intermediates`), so a dense head is one more
class beside `LinearHead`, not another way of running the tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn


@dataclass
class ImageFeatures:
    """`pooled` [B, D]: the tower's embedding, projected, not normalised (`encode_image`);
    `blocks`: 1-based block number -> that block's patch tokens as a map [B, W, H', W'] (class
    token left out), only for the blocks a head asks for."""

    pooled: torch.Tensor
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)


def image_features(visual: nn.Module, images: torch.Tensor, blocks: Sequence[int] = ()) -> ImageFeatures:
    """The features a head with these `blocks` reads, from one forward pass of `visual`.

    `visual` may be wrapped (a peft model forwards `forward_intermediates` to the tower inside).
    """
    if not blocks:
        return ImageFeatures(visual(images))
    if not hasattr(visual, "forward_intermediates"):
        raise ValueError(
            f"a head reading blocks {list(blocks)} needs a tower with forward_intermediates "
            f"(open_clip's ViT, timm towers), not {type(visual).__name__}; use a head on the pooled "
            "embedding (blocks: [])"
        )
    out = visual.forward_intermediates(images, indices=[int(b) - 1 for b in blocks], output_fmt="NCHW")
    return ImageFeatures(out["image_features"], dict(zip(blocks, out["image_intermediates"], strict=True)))


def embedding_width(model: nn.Module) -> int:
    """The width of `model.encode_image`'s output: the tower's `output_dim` where it has one, else
    measured on one blank image at the model's input size (timm towers do not record it)."""
    width = getattr(model.clip.visual, "output_dim", None)
    if isinstance(width, int):
        return width
    blank = model.preprocess(Image.new("RGB", (8, 8)))[None]
    param = next(model.parameters())
    with torch.no_grad():
        return int(model.encode_image(blank.to(param.device, param.dtype)).shape[-1])


class LinearHead(nn.Module):
    """One linear layer on the pooled embedding (after optional dropout): a linear probe's model,
    trained together with the tower, or alone when the tower is frozen."""

    blocks: tuple[int, ...] = ()

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head dropout={dropout} must be in [0, 1)")
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, features: ImageFeatures) -> torch.Tensor:
        return self.linear(self.dropout(features.pooled))
