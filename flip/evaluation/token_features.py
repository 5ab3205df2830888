"""The token probe's vectors of a benchmark split, extracted once per image and cached on disk.

A token probe trains for many epochs over the same images; what it reads of each image is a
few vectors per block (flip.models.probe_tokens), never the whole token map: 12 x 768 floats
of a ViT-B/16 image instead of 4 x 197 x 768. They are cached through the same FeatureCache as
pooled features, under a model identity that also names the kind of features and the blocks,
so a pooled-feature cache entry and a token-probe entry of another block choice never meet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import torch

from flip.benchmarks.base import ImageSource, LabelledSplit
from flip.evaluation.features import (
    BenchmarkFeatures,
    FeatureCache,
    SplitFeatures,
    cached_split,
    encode_images,
)
from flip.models import FlipModel
from flip.models.probe_tokens import resolve_probe_blocks

log = logging.getLogger(__name__)
KIND = "token_probe_vectors"


def tower_depth(model: FlipModel) -> int:
    """Blocks of the image tower (0 when it has no open_clip transformer; the model method says why)."""
    transformer = getattr(getattr(model.clip, "visual", None), "transformer", None)
    return len(getattr(transformer, "resblocks", []))


def extract_token_vectors(
    model: FlipModel,
    images: ImageSource,
    blocks: Sequence[int | str],
    batch_size: int = 256,
    num_workers: int = 0,
    description: str = "token-probe vectors",
    progress: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    """Vectors [M, 3 * len(blocks), width] (float32, CPU) of the readable images, and their indices."""

    def encode(batch: torch.Tensor) -> torch.Tensor:
        return model.token_probe_vectors(batch, blocks)

    return encode_images(model, images, encode, batch_size, num_workers, description, progress)


def token_vectors_identity(model_id: str, blocks: Sequence[int | str]) -> str:
    """The cache identity of token-probe vectors: the model, this kind of features, the blocks."""
    return json.dumps({"model": model_id, "kind": KIND, "blocks": list(blocks)})


def split_token_vectors(
    model: FlipModel,
    split: LabelledSplit,
    blocks: Sequence[int | str],
    model_id: str | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> SplitFeatures:
    """Token-probe vectors of a split (SplitFeatures with [N, V, width] features), cached when
    `model_id` names the model."""
    identity = None if model_id is None else token_vectors_identity(model_id, blocks)
    key = cache.key(identity, split) if cache is not None and identity is not None else None

    def extract() -> tuple[torch.Tensor, list[int]]:
        description = f"{split.benchmark}/{split.split} token vectors"
        return extract_token_vectors(
            model, split.images, blocks, batch_size, num_workers, description, progress
        )

    about = {"model": model_id, "kind": KIND, "blocks": list(blocks)}
    return cached_split(split, cache, key, extract, about, "token vectors")


def benchmark_token_vectors(
    features: BenchmarkFeatures,
    split: str | None,
    blocks: Sequence[int | str] | None,
    max_samples: int | None = None,
    seed: int = 0,
) -> SplitFeatures:
    """The vectors of `split` (None: the evaluated split) of the benchmark `features` serves, with
    its model, cache and loader settings; recorded in `features.requested`, so the evaluation
    reports the split's skipped images as for pooled features."""
    key = features.evaluated if split is None else (split, max_samples, seed)
    resolved = (
        resolve_probe_blocks(blocks, tower_depth(features.model)) if tower_depth(features.model) else blocks
    )
    found = split_token_vectors(
        features.model,
        features.benchmark.load(*key),
        resolved,
        features.model_id,
        features.cache,
        features.batch_size,
        features.num_workers,
        features.progress,
    )
    features.requested.append(found)
    return found
