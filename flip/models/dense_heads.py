"""Light heads from a ViT's patch-token maps to dense outputs: part logits and landmarks.

A frozen tower's blocks differ in scale by orders of magnitude, so each block's tokens get a
LayerNorm of their own before one linear map per token (a 1x1 convolution) over all of them:
a per-token linear classifier, the dense analogue of a linear probe. Its maps live on the
patch grid; `upsample` takes logits to the label size (bilinear, as FaRL's heads and DINOv2's
linear segmentation do), and `soft_argmax` reads points off per-point heatmaps as the expected
position under their softmax, which is differentiable and finer than the grid.

The same modules serve a frozen-tower probe (flip.evaluation.dense_probe) and a fine-tuned one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenMapHead(nn.Module):
    """[B, blocks, width, h, w] token maps -> [B, out_channels, h, w] per-token linear outputs."""

    def __init__(self, blocks: int, width: int, out_channels: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.linear = nn.Linear(blocks * width, out_channels)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if maps.dim() != 5 or maps.shape[1] != len(self.norms):
            raise ValueError(
                f"token maps of shape {tuple(maps.shape)}; expected [B, {len(self.norms)}, width, h, w]"
            )
        x = maps.permute(0, 3, 4, 1, 2)  # [B, h, w, blocks, width]
        x = torch.cat([norm(x[..., i, :]) for i, norm in enumerate(self.norms)], dim=-1)
        return self.linear(x).permute(0, 3, 1, 2)


def upsample(logits: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [B, C, h, w] maps to `size` (pixel centres aligned, as image resizing)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def soft_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """[B, K, h, w] heatmap logits -> [B, K, 2] expected (x, y) under each map's softmax, as
    fractions of the map (0..1 across it; a cell's centre is at (j + 0.5) / w)."""
    batch, points, height, width = heatmaps.shape
    weights = heatmaps.float().flatten(2).softmax(dim=-1).view(batch, points, height, width)
    xs = (torch.arange(width, device=heatmaps.device, dtype=torch.float32) + 0.5) / width
    ys = (torch.arange(height, device=heatmaps.device, dtype=torch.float32) + 0.5) / height
    return torch.stack([(weights.sum(dim=2) * xs).sum(-1), (weights.sum(dim=3) * ys).sum(-1)], dim=-1)


class LandmarkHead(nn.Module):
    """Token maps -> [B, K, 2] points as fractions of the input crop: a `TokenMapHead` gives one
    heatmap per point, upsampled by `upscale` (bilinear) and read by `soft_argmax`."""

    def __init__(self, blocks: int, width: int, points: int, upscale: int = 4) -> None:
        super().__init__()
        self.maps = TokenMapHead(blocks, width, points)
        self.upscale = upscale

    def heatmaps(self, maps: torch.Tensor) -> torch.Tensor:
        logits = self.maps(maps)
        return upsample(logits, (logits.shape[-2] * self.upscale, logits.shape[-1] * self.upscale))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return soft_argmax(self.heatmaps(maps))
