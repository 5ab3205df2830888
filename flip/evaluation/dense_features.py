"""What the dense probes read of a split: each face's crop, its token maps, its labels there.

Every face is cut as its split's DenseLabels say (the face box, or the whole image, made
square: flip.benchmarks.dense) and the crop goes through the model's own preprocessing,
which on a square image is a plain resize: the token grid then covers the crop exactly, and
labels are placed on the same square. The chosen blocks' patch tokens (`patch_token_maps`) are
extracted once per image and cached in float16 through the same FeatureCache as pooled
features, under an identity that names this kind of features, the blocks and the crops.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from flip.benchmarks.base import ImageSource, LabelledSplit, digest
from flip.benchmarks.dense import Crop, DenseLabels, label_map, points_to_crop
from flip.evaluation.features import BenchmarkFeatures, SplitFeatures, cached_split, encode_images
from flip.evaluation.token_features import tower_depth
from flip.models import FlipModel
from flip.models.probe_tokens import resolve_probe_blocks

KIND = "dense_token_maps"


@dataclass(frozen=True)
class DenseCrops:
    """The images of a dense split, each cut to its square crop (an ImageSource)."""

    images: ImageSource
    dense: DenseLabels

    def __len__(self) -> int:
        return len(self.images)

    def crop(self, index: int) -> Crop:
        return self.dense.crop(index, *self.images.size(index))

    def load(self, index: int) -> Image.Image:
        image = self.images.load(index)
        c = self.dense.crop(index, *image.size)
        return image.crop((c.x0, c.y0, c.x0 + c.side, c.y0 + c.side))

    def size(self, index: int) -> tuple[int, int]:
        side = self.crop(index).side
        return side, side

    def describe(self, index: int) -> str:
        return self.images.describe(index)

    def subset(self, indices: Sequence[int]) -> DenseCrops:
        return DenseCrops(self.images.subset(indices), self.dense.subset(indices))

    def fingerprint(self) -> str:
        return digest(self.images.fingerprint(), self.dense.fingerprint())


def dense_blocks(model: FlipModel, blocks: Sequence[int | str] | None) -> list[int | str]:
    """`blocks` checked against the image tower (None: FLIP's token-probe blocks at its depth)."""
    depth = tower_depth(model)
    if not depth:
        model.patch_token_maps(torch.zeros(1, 3, 8, 8), blocks)  # raises, naming what works
    return resolve_probe_blocks(blocks, depth)


def split_token_maps(
    features: BenchmarkFeatures, split: LabelledSplit, blocks: Sequence[int | str]
) -> SplitFeatures:
    """Token maps [N, blocks, width, h, w] (float16) of the split's crops, with the model, cache and
    loader settings `features` serves; recorded in `features.requested` so the evaluation reports
    the split's skipped images."""
    if split.dense is None:
        raise ValueError(
            f"{split.benchmark}/{split.split} is a {split.task} split; a dense probe needs a parsing or "
            "landmark benchmark (lapa, celebamask_hq, wflw, 300w, aflw19, faceshapes_parsing, ...)"
        )
    model, crops = features.model, DenseCrops(split.images, split.dense)
    identity = None
    if features.model_id is not None:
        identity = json.dumps(
            {"model": features.model_id, "kind": KIND, "blocks": list(blocks), "crops": crops.fingerprint()}
        )
    key = features.cache.key(identity, split) if features.cache is not None and identity else None

    def extract() -> tuple[torch.Tensor, list[int]]:
        def encode(batch: torch.Tensor) -> torch.Tensor:
            return model.patch_token_maps(batch, blocks)

        description = f"{split.benchmark}/{split.split} token maps"
        return encode_images(
            model,
            crops,
            encode,
            features.batch_size,
            features.num_workers,
            description,
            features.progress,
            dtype=torch.float16,
        )

    about = {"model": features.model_id, "kind": KIND, "blocks": list(blocks)}
    found = cached_split(split, features.cache, key, extract, about, "token maps")
    features.requested.append(found)
    return found


def benchmark_split(
    features: BenchmarkFeatures, split: str | None, max_samples: int | None, seed: int
) -> LabelledSplit:
    """The LabelledSplit `split` of the benchmark (None: the evaluated split, its subsample)."""
    key = features.evaluated if split is None else (split, max_samples, seed)
    return features.benchmark.load(*key)


def label_maps(split: LabelledSplit, size: int) -> np.ndarray:
    """[N, size, size] uint8: each face's mask on its crop, at `size` (IGNORE off the image)."""
    crops = DenseCrops(split.images, split.dense)
    out = np.empty((len(split), size, size), dtype=np.uint8)
    for i in range(len(split)):
        out[i] = label_map(split.dense.masks.load(i), split.images.size(i), crops.crop(i), size)
    return out


def crop_points(split: LabelledSplit) -> tuple[np.ndarray, list[Crop]]:
    """[N, K, 2] each face's points as fractions of its crop, and the crops."""
    crops = DenseCrops(split.images, split.dense)
    chosen = [crops.crop(i) for i in range(len(split))]
    points = np.stack([points_to_crop(split.dense.points[i], c) for i, c in enumerate(chosen)])
    return points, chosen
