"""Light heads from a ViT's patch-token maps to dense outputs: part logits and landmarks.

A frozen tower's blocks differ in scale by orders of magnitude, so each block's tokens get a
LayerNorm of their own before one linear map per token (a 1x1 convolution) over all of them:
a per-token linear classifier, the dense analogue of a linear probe. Its maps live on the
patch grid; `upsample` takes logits to the label size (bilinear, as FaRL's heads and DINOv2's
linear segmentation do), and `soft_argmax` reads points off per-point heatmaps as the expected
position under their softmax, which is differentiable and finer than the grid.

The same modules serve a frozen-tower probe (flip.evaluation.dense_probe) and a fine-tuned one:
`LinearMapHead` is that per-token map reading `image_features` (flip.models.heads), and
`FPNHead` a small UPerNet-style head over several blocks, as FaRL fine-tuned its ViT with;
`HeatmapPoints` turns either into a landmark head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flip.models.heads import ImageFeatures


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


def _stacked(features: ImageFeatures, blocks: Sequence[int]) -> torch.Tensor:
    """[B, len(blocks), width, h, w]: the maps `image_features` gave for `blocks`, in their order."""
    missing = [b for b in blocks if b not in features.blocks]
    if missing:
        raise ValueError(f"the features hold blocks {sorted(features.blocks)}, not {missing}")
    return torch.stack([features.blocks[b] for b in blocks], dim=1)


def _checked_blocks(blocks: Sequence[int]) -> tuple[int, ...]:
    if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
        raise ValueError(
            f"head blocks={list(blocks)}: give 1-based block numbers of the tower, e.g. [4, 6, 8, 12]"
        )
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"head blocks={list(blocks)} names a block twice")
    return tuple(int(b) for b in blocks)


class LinearMapHead(nn.Module):
    """The probes' per-token linear head (`TokenMapHead`) for a fine-tune: it reads the patch
    tokens of `blocks` (1-based) from `image_features` and gives [B, out_channels, h, w] on the
    token grid. `upscale` is how much finer than the grid its output is (1: not at all)."""

    upscale = 1

    def __init__(self, width: int, out_channels: int, blocks: Sequence[int]) -> None:
        super().__init__()
        self.blocks = _checked_blocks(blocks)
        self.maps = TokenMapHead(len(self.blocks), width, out_channels)
        self.description = f"per-token linear (LayerNorm per block, 1x1 linear) on blocks {list(self.blocks)}"

    def forward(self, features: ImageFeatures) -> torch.Tensor:
        return self.maps(_stacked(features, self.blocks))


def _groups(channels: int) -> int:
    """GroupNorm's groups: 32 where they divide `channels` (as detectron's heads), else fewer."""
    return math.gcd(32, channels)


def _conv(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """Convolution, GroupNorm, ReLU: GroupNorm has no running statistics, so a head trains the
    same with a batch of 2 as of 64 and evaluates as it trained."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.GroupNorm(_groups(out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


def _rescale(width: int, factor: float) -> nn.Module:
    """A ViT map to `factor` times its resolution, as ViTDet's simple pyramid (FaRL's UPer head
    on ViT): stride-2 transposed convolutions to go finer, max pooling to go coarser."""
    if factor == 1:
        return nn.Identity()
    if factor < 1:
        return nn.MaxPool2d(kernel_size=round(1 / factor))
    layers: list[nn.Module] = []
    for step in range(round(math.log2(factor))):
        if step:
            layers += [nn.GroupNorm(_groups(width), width), nn.GELU()]
        layers.append(nn.ConvTranspose2d(width, width, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class FPNHead(nn.Module):
    """A small UPerNet-style head over several blocks, as FaRL's dense heads on its ViT.

    The i-th of the `blocks` (shallow to deep) is taken to 4 / 2**i times the token grid (4x, 2x,
    1x, 1/2x for four blocks: a pyramid from one-scale ViT maps), each level is LayerNorm-ed and
    projected to `channels` (lateral 1x1), the coarser levels are added into the finer ones top
    down (FPN) and smoothed (3x3), and all levels, upsampled to the finest, are fused (3x3) and
    classified (1x1): [B, out_channels, 4h, 4w] for an h x w grid. The task upsamples that
    bilinearly to its labels (parsing) or reads points off it (landmarks).
    """

    def __init__(self, width: int, out_channels: int, blocks: Sequence[int], channels: int = 64) -> None:
        super().__init__()
        self.blocks = _checked_blocks(blocks)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"head channels={channels!r} must be an integer >= 1")
        self.factors = [4 / 2**i for i in range(len(self.blocks))]
        self.upscale = 4
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in self.blocks)
        self.rescale = nn.ModuleList(_rescale(width, f) for f in self.factors)
        self.lateral = nn.ModuleList(_conv(width, channels, 1) for _ in self.blocks)
        self.smooth = nn.ModuleList(_conv(channels, channels, 3) for _ in self.blocks)
        self.fuse = _conv(len(self.blocks) * channels, channels, 3)
        self.classify = nn.Conv2d(channels, out_channels, 1)
        self.description = (
            f"FPN/UPer (levels x{', x'.join(f'{f:g}' for f in self.factors)} of the grid, "
            f"{channels} channels) on blocks {list(self.blocks)}"
        )

    def forward(self, features: ImageFeatures) -> torch.Tensor:
        maps = _stacked(features, self.blocks)
        levels = []
        for i in range(len(self.blocks)):
            x = self.norms[i](maps[:, i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            levels.append(self.lateral[i](self.rescale[i](x)))
        for i in range(len(levels) - 2, -1, -1):  # top down: each coarser level into the finer one
            levels[i] = levels[i] + upsample(levels[i + 1], levels[i].shape[-2:])
        finest = levels[0].shape[-2:]
        fused = [upsample(smooth(x), finest) for smooth, x in zip(self.smooth, levels, strict=True)]
        return self.classify(self.fuse(torch.cat(fused, dim=1)))


class HeatmapPoints(nn.Module):
    """A dense head's maps as per-point heatmaps, read by `soft_argmax`: [B, K, 2] points as
    fractions of the input crop. `upscale`: the heatmaps' side over the head's own output's
    (bilinear, before soft-argmax), so a grid-resolution head still places points finely."""

    def __init__(self, maps: nn.Module, upscale: int = 1) -> None:
        super().__init__()
        self.maps, self.scale = maps, upscale
        self.blocks = maps.blocks
        self.description = f"{maps.description}, heatmaps x{upscale}, soft-argmax"

    def forward(self, features: ImageFeatures) -> torch.Tensor:
        logits = self.maps(features)
        if self.scale != 1:
            logits = upsample(logits, (logits.shape[-2] * self.scale, logits.shape[-1] * self.scale))
        return soft_argmax(logits)
