"""A convolutional stem for open_clip's ViT: stride-2 3x3 convolutions in place of the patch projection.

A ViT trained from scratch sees each patch through one linear map of its pixels, and learns
slowly what lies in a few pixels (FaceShapes' mustache and expression at 64 px). Xiao et al.
(2021, "Early Convolutions Help Transformers See Better", ViT_C) replace that projection with a
few 3x3 stride-2 convolutions (batch norm, ReLU) and a 1x1 convolution to the ViT's width: the
same token grid from overlapping receptive fields, which trains faster and more steadily for a
few percent more compute. The stem takes the place of `visual.conv1`, so everything that reads
the ViT's tokens (FILIP, the token, dense and parsing probes, fine-tuning at another input size)
works unchanged. open_clip cannot build it: such a model exports to safetensors or ONNX, not to
an open_clip folder (flip.export.open_clip_format says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

__all__ = ["ConvStem", "StatsInFloat32BatchNorm2d", "add_conv_stem"]


class StatsInFloat32BatchNorm2d(nn.BatchNorm2d):
    """Batch norm that still runs when an engine has cast its parameters but not its statistics.

    DeepSpeed 0.19 in bf16/fp16 casts parameters only and leaves buffers at their dtype, so the
    stem's batch norms would meet bf16 weights beside float32 running statistics, which torch's
    kernels refuse. Then the normalisation runs in float32 (weights upcast, statistics kept and
    updated in float32, as mixed-precision training keeps batch norm) and returns the input's
    dtype. Every other case is plain `nn.BatchNorm2d`, with the same state dict.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.running_mean
        if self.weight is None or stats is None or self.weight.dtype == stats.dtype:
            return super().forward(x)
        momentum = self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative average, as nn.BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        with torch.autocast(x.device.type, enabled=False):
            y = F.batch_norm(
                x.float(), stats, self.running_var, self.weight.float(), self.bias.float(),
                training=self.training, momentum=momentum or 0.0, eps=self.eps,
            )  # fmt: skip
        return y.to(x.dtype)


class ConvStem(nn.Sequential):
    """[B, 3, H, W] -> [B, width, H / 2^n, W / 2^n] through n stride-2 convolutions of `channels`."""

    def __init__(self, channels: Sequence[int], width: int) -> None:
        layers: list[nn.Module] = []
        previous = 3
        for count in channels:
            layers += [
                nn.Conv2d(previous, count, kernel_size=3, stride=2, padding=1, bias=False),
                StatsInFloat32BatchNorm2d(count),
                nn.ReLU(inplace=True),
            ]
            previous = count
        layers.append(nn.Conv2d(previous, width, kernel_size=1))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutions on a channels-last copy of the images: on the CPU, oneDNN computes
        these small-channel convolutions and their gradients faster in that layout
        (bench/image_stem_layout.py). The output stays channels last, which is the layout the
        ViT's flatten to [B, tokens, width] reads without a copy; the weights keep their usual
        layout, so checkpoints and exports do not change."""
        return super().forward(x.contiguous(memory_format=torch.channels_last))


def add_conv_stem(visual: nn.Module, stem: Mapping[str, Any]) -> None:
    """Replace the ViT `visual`'s patch projection by a `ConvStem` (`model.image_stem`: {channels}).

    Its stride, 2 to the number of channel counts, must equal the patch size, so that the token
    grid, the positional embedding and every reader of the tokens stay as open_clip built them.
    """
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"model.image_stem replaces a ViT's patch projection; this image tower is "
            f"{type(visual).__name__}. Use an open_clip ViT architecture, or model.image_stem=null"
        )
    channels = stem.get("channels") if isinstance(stem, Mapping) else None
    valid = isinstance(channels, Sequence) and all(isinstance(c, int) and c >= 1 for c in channels)
    if not valid or not channels or set(stem) != {"channels"}:
        raise ValueError(
            f"model.image_stem={stem!r}: expected {{channels: [c1, c2, ...]}}, one positive "
            f"channel count per stride-2 convolution, e.g. {{channels: [24, 48, 96]}} for patch size 8"
        )
    patch_h, patch_w = visual.patch_size
    stride = 2 ** len(channels)
    if patch_h != patch_w or stride != patch_h:
        fits = patch_h == patch_w and patch_h & (patch_h - 1) == 0  # a square power-of-2 patch
        hint = (
            f"give {patch_h.bit_length() - 1} channel counts"
            if fits
            else "a convolutional stem needs a square patch whose size is a power of 2"
        )
        raise ValueError(
            f"model.image_stem.channels={list(channels)} makes a stem of stride {stride}, but the ViT's "
            f"patch size is {patch_h}x{patch_w}: {hint}"
        )
    visual.conv1 = ConvStem(list(channels), visual.conv1.out_channels)
