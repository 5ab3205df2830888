"""From a decoded sample to the model's tensors, with the per-batch work done once per batch.

open_clip's image transforms end in `ToTensor` and `Normalize`, and its tokenizers take a list
of captions. Per sample, the float conversion allocates two float copies of each image and the
tokenizer pays its call overhead once per caption. `SampleTransform` splits the work: `prepare`
(in the loader, per sample) runs the PIL part of the transform and keeps the image as uint8;
`collate` (per batch) converts and normalises all images in one tensor operation and tokenizes
all captions in one call. The arithmetic per pixel is the one `ToTensor` and `Normalize` do
(`x / 255`, then `(x - mean) / std`, in float32), so the tensors are bit-identical to
`preprocess(image)` stacked.

Large JPEGs decode at reduced scale (`reduced_decode_size`, `shards.decode_image`): when the
stored image is at least twice the crop's output size, libjpeg's DCT scaling decodes it at
1/2, 1/4 or 1/8 of its size, never below the output size. The random crop is then drawn on the
full-size geometry (the same random numbers, the same region) and cut from the smaller image
by a resize with a fractional box, so only the resampling differs from the full decode.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import Compose, Normalize, RandomResizedCrop, ToTensor
from torchvision.transforms import functional as F

__all__ = ["SampleTransform", "reduced_decode_size", "seeded_augmentation", "split_preprocess"]


def split_preprocess(preprocess: Callable) -> tuple[Callable, Normalize | None]:
    """(per-sample part, final `Normalize`) of a transform ending in `ToTensor`, `Normalize`.

    Any other transform is kept whole, per sample: (preprocess, None).
    """
    steps = list(getattr(preprocess, "transforms", ())) if isinstance(preprocess, Compose) else []
    if len(steps) < 2:
        return preprocess, None
    *head, to_tensor, normalize = steps
    if not isinstance(to_tensor, ToTensor) or type(normalize) is not Normalize or normalize.inplace:
        return preprocess, None
    return Compose(head), normalize


def reduced_decode_size(preprocess: Callable) -> tuple[int, int] | None:
    """(width, height) a JPEG may be decoded down to for `preprocess`, or None when it must be decoded whole.

    Only a transform that starts with `RandomResizedCrop` qualifies: the crop is drawn on the
    stored size (see `SampleTransform.prepare`) and its output size bounds the decode from below.
    """
    steps = getattr(preprocess, "transforms", None) if isinstance(preprocess, Compose) else None
    if not steps or not isinstance(steps[0], RandomResizedCrop):
        return None
    height, width = steps[0].size
    return width, height


def _pixels(image) -> np.ndarray | torch.Tensor:
    """An RGB image as its uint8 (height, width, 3) pixels, anything else as `ToTensor` makes it."""
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return np.asarray(image)
    return image if isinstance(image, torch.Tensor) else F.to_tensor(image)


def _to_float(pixels: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """A float32 (batch, channels, height, width) batch, each value as `ToTensor` computes it (x / 255)."""
    if all(isinstance(p, np.ndarray) for p in pixels) and len({p.shape for p in pixels}) == 1:
        batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
        return batch.to(torch.float32).div_(255)
    return torch.stack([F.to_tensor(p) if isinstance(p, np.ndarray) else p for p in pixels])


@dataclass
class SampleTransform:
    """Turns decoded samples into (image tensor, token ids); picklable for loader workers.

    Called on one sample it returns that sample's tensors; a pipeline calls `prepare` per sample
    and `collate` per batch, which gives the same tensors, stacked, for less work.
    """

    preprocess: Callable
    tokenizer: Callable
    # keep each caption's token ids after its first batch (`cache_in_memory` of the data config):
    # a caption's ids do not depend on the rest of its batch, and a dataset trained for many
    # epochs tokenizes the same captions again on every pass
    cache_tokens: bool = False
    # `data.hard_negatives` (`flip.data.foils.FoilMaker`): each sample also gets its foils, and
    # a batch two more tensors, the foils' token ids [B, F, L] and which of them exist [B, F]
    foils: Callable | None = None
    # `data.captions` (`flip.data.caption_fields.CaptionSampler`): the caption this step trains on,
    # drawn from the sample's caption fields; None: the `.txt` as it is
    captions: Callable | None = None
    per_sample: Callable = field(init=False, repr=False)
    normalize: Normalize | None = field(init=False, repr=False)
    decode_size: tuple[int, int] | None = field(init=False, repr=False)
    _token_ids: dict[str, torch.Tensor] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.per_sample, self.normalize = split_preprocess(self.preprocess)
        self.decode_size = reduced_decode_size(self.preprocess) if self.normalize is not None else None

    def prepare(self, sample: dict) -> tuple:
        """(pixels, caption) of one sample, and its foil captions with `foils`; its random augmentation
        seeded by `__seed__` when it has one. With `captions`, the caption is the one it draws."""
        if self.captions is not None:  # before the foils: they change the caption trained on
            sample = {**sample, "text": self.captions(sample)}
        seed = sample.get("__seed__")
        if seed is None:
            prepared = self._augment(sample), sample["text"]
        else:
            with seeded_augmentation(seed):
                prepared = self._augment(sample), sample["text"]
        if self.foils is None:
            return prepared
        return (*prepared, [None if foil is None else foil.text for foil in self.foils(sample)])

    def _augment(self, sample: dict):
        image, full_size = sample["image"], sample.get("full_size")
        if self.normalize is None:
            return self.preprocess(image)
        if full_size is None or full_size == image.size:
            return _pixels(self.per_sample(image))
        # decoded at reduced scale: the crop drawn on the stored geometry, cut from the smaller image
        crop, *rest = self.per_sample.transforms
        top, left, height, width = crop.get_params(
            torch.empty(1, 1, 1).expand(1, full_size[1], full_size[0]), crop.scale, crop.ratio
        )
        sx, sy = image.size[0] / full_size[0], image.size[1] / full_size[1]
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
        image = image.resize((crop.size[1], crop.size[0]), F.pil_modes_mapping[crop.interpolation], box=box)
        for step in rest:
            image = step(image)
        return _pixels(image)

    def collate(self, prepared: Sequence[tuple]) -> list[torch.Tensor]:
        """[images, token ids] of a batch of `prepare` outputs (a list, as webdataset's default collation);
        with `foils`, also the foils' token ids [B, F, L] and mask [B, F]."""
        images, texts, *foils = zip(*prepared, strict=True)
        # without a split-off Normalize the whole transform ran per sample
        batch = torch.stack(list(images)) if self.normalize is None else self.normalize(_to_float(images))
        if not foils:
            return [batch, self._tokenize(list(texts))]
        return [batch, *self._tokenize_with_foils(list(texts), foils[0])]

    def _tokenize_with_foils(
        self, texts: list[str], foils: Sequence[list[str]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids of the captions and of their foils [B, F, L] (F: the maker's slots per caption,
        missing foils as empty captions), and the mask of the foils that exist: [B, F], or
        [B, groups, values] for statement groups (`form: statement`), which tells the loss so."""
        shape = self.foils.slot_shape
        width = math.prod(shape)
        present = [[i < len(f) and f[i] is not None for i in range(width)] for f in foils]
        mask = torch.tensor(present, dtype=torch.bool).view(len(texts), *shape)
        padded = [f[i] if i < len(f) and f[i] is not None else "" for f in foils for i in range(width)]
        tokens = self._tokenize(texts + padded)
        return tokens[: len(texts)], tokens[len(texts) :].view(len(texts), width, -1), mask

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        if not self.cache_tokens:
            return self.tokenizer(texts)
        new = [text for text in dict.fromkeys(texts) if text not in self._token_ids]
        if new:
            self._token_ids.update(zip(new, self.tokenizer(new).unbind(0), strict=True))
        return torch.stack([self._token_ids[text] for text in texts])

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images, tokens = self.collate([self.prepare(sample)])
        return images[0], tokens[0]


@contextmanager
def seeded_augmentation(seed: int):
    """Random transforms draw from generators seeded by the sample, then the global ones resume.

    torchvision draws from torch's CPU generator and some transforms (timm's) from Python's
    `random`; both are restored after, so training randomness does not depend on the data.
    """
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
