"""Image and text features of a benchmark split, extracted once and cached on disk.

A linear probe sweeps many regularisation strengths and few-shot fractions over the same
features, and a zero-shot run and a probe on the same split need the same test features:
extracting them once per (model, benchmark, split) is most of the cost of evaluation.
The cache key names the model (checkpoint file identity, or open_clip architecture + tag)
and the exact images (paths with sizes and mtimes, or the encoded bytes), so a retrained
checkpoint or a changed image never reads stale features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.progress import track
from torch.utils.data import DataLoader, Dataset

from flip.benchmarks.base import ImageSource, LabelledSplit
from flip.checkpoint import atomic_torch_save
from flip.models import FlipModel

if TYPE_CHECKING:  # flip-query extracts features without benchmarks (or Hydra)
    from flip.evaluation.benchmark import Benchmark

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass
class SplitFeatures:
    """L2-normalised image features of the readable images of a split, and which they are.

    `split` is already restricted to the readable images, so `features[i]` belongs to
    `split.keys[i]`; `skipped` counts unreadable images.
    """

    features: torch.Tensor
    split: LabelledSplit
    skipped: int = 0


class _Images(Dataset):
    def __init__(self, images: ImageSource, preprocess) -> None:
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            return self.preprocess(self.images.load(index)), index
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for missing/corrupt files
            log.warning("skipped unreadable image %s (%s)", self.images.describe(index), exc)
            return None, index


def _collate(batch: list) -> tuple[torch.Tensor | None, list[int]]:
    kept = [(x, i) for x, i in batch if x is not None]
    if not kept:
        return None, []
    return torch.stack([x for x, _ in kept]), [i for _, i in kept]


def resolve_device(device: str | None) -> torch.device:
    """`auto` (or None): the GPU when there is one, else the CPU; anything else as torch reads it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype of the weights, which images must have too: a model trained under
    DeepSpeed holds bf16 (or fp16) weights, and a convolution refuses fp32 images for them."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def encode_images(
    model: FlipModel,
    images: ImageSource,
    encode: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
    num_workers: int = 0,
    description: str = "image features",
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[int]]:
    """`encode(batch)` (as `dtype`, on the CPU) of every readable image, and their indices: the one
    loop over a benchmark's images (preprocessing, unreadable images skipped, eval mode, progress)
    behind pooled features, the token probe's vectors and the dense probes' token maps alike.

    `progress=False` when another live display is active (e.g. inside a training loop).
    """
    device, weights = model_device(model), model_dtype(model)
    loader = DataLoader(
        _Images(images, model.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    encoded, kept = [], []
    was_training = model.training
    model.eval()
    try:
        batches = track(loader, description=description, transient=True) if progress else loader
        for batch, indices in batches:
            if batch is None:
                continue
            encoded.append(encode(batch.to(device, weights)).to(dtype).cpu())
            kept.extend(indices)
    finally:
        model.train(was_training)
    if not kept:
        raise ValueError(f"none of the {len(images)} images could be read, e.g. {images.describe(0)!r}")
    return torch.cat(encoded), kept


def extract_image_features(
    model: FlipModel,
    images: ImageSource,
    batch_size: int = 256,
    num_workers: int = 0,
    description: str = "image features",
    progress: bool = True,
    flip: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """Normalised features [M, D] (float32, CPU) of the readable images, and their indices.

    `flip=True` gives each image the sum of its own and its horizontal mirror's embedding,
    normalised after summing (insightface's verification eval; the mirror is taken of the
    preprocessed tensor, so one decode serves both).
    """

    def encode(batch: torch.Tensor) -> torch.Tensor:
        if flip:
            summed = model.encode_image(batch) + model.encode_image(batch.flip(-1))
            return torch.nn.functional.normalize(summed.float(), dim=-1)
        return model.encode_image(batch, normalize=True)

    return encode_images(model, images, encode, batch_size, num_workers, description, progress)


@torch.no_grad()
def extract_text_features(model: FlipModel, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised text features [N, D] (float32, CPU) of `texts`, in order."""
    device = model_device(model)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenize(list(texts[start : start + batch_size])).to(device)
        out.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def model_identity(
    ckpt: str | os.PathLike | None = None, name: str | None = None, pretrained: str | None = None
) -> str:
    """What a cache key needs to know of a model: the checkpoint file (or folder) as it is now,
    or the open_clip architecture and pretrained tag (with the file's identity if it is a path)."""

    def stat(path: str | os.PathLike) -> list:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]

    if ckpt is not None:
        return json.dumps({"ckpt": stat(ckpt)})
    if name is None:
        raise ValueError("a model identity needs ckpt or an open_clip name")
    tag = stat(pretrained) if pretrained is not None and os.path.exists(pretrained) else pretrained
    return json.dumps({"open_clip": name, "pretrained": tag})


class FeatureCache:
    """Features on disk under `directory`, one file per (model, benchmark, split, images)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def key(self, model_id: str, split: LabelledSplit, flip: bool = False) -> str:
        parts = [CACHE_VERSION, model_id, split.benchmark, split.split, split.images.fingerprint()]
        parts += ["flip"] if flip else []  # flip-summed features are other features
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def load(self, key: str) -> tuple[torch.Tensor, list[int]] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return data["features"], data["index"].tolist()
        except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as exc:
            log.warning("ignoring unreadable feature cache %s (%s)", path, exc)
            return None

    def save(self, key: str, features: torch.Tensor, index: list[int], description: dict) -> Path:
        """Written to a temporary file and renamed: a killed run never leaves half a cache file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        atomic_torch_save({"features": features, "index": torch.as_tensor(index, dtype=torch.int64)}, path)
        path.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
        return path


def split_features(
    model: FlipModel,
    split: LabelledSplit,
    model_id: str | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
    flip: bool = False,
) -> SplitFeatures:
    """Features of a split, from the cache when (model_id, split) was extracted before;
    `flip`: each image's and its mirror's embedding summed (see extract_image_features)."""
    key = cache.key(model_id, split, flip) if cache is not None and model_id is not None else None

    def extract() -> tuple[torch.Tensor, list[int]]:
        return extract_image_features(
            model,
            split.images,
            batch_size,
            num_workers,
            f"{split.benchmark}/{split.split} features",
            progress,
            **({"flip": True} if flip else {}),  # the plain call unchanged for callers that wrap it
        )

    return cached_split(split, cache, key, extract, {"model": model_id, "flip": flip}, "features")


def cached_split(
    split: LabelledSplit,
    cache: FeatureCache | None,
    key: str | None,
    extract: Callable[[], tuple[torch.Tensor, list[int]]],
    description: dict,
    what: str,
) -> SplitFeatures:
    """What `extract()` gives for a split, read from `cache` under `key` when it was saved
    before, else extracted and saved there (with `description` beside it); the split restricted
    to its readable images. Pooled features and the token probe's vectors both come through here."""
    found = cache.load(key) if cache is not None and key is not None else None
    if found is not None:
        features, index = found
        log.info("%s of %s/%s from cache %s", what, split.benchmark, split.split, cache.path(key))
    else:
        features, index = extract()
        if cache is not None and key is not None:
            about = {"benchmark": split.benchmark, "split": split.split, "n": len(index), **description}
            cache.save(key, features, index, about)
    skipped = len(split) - len(index)
    kept = split if skipped == 0 else split.subset(np.asarray(index))
    return SplitFeatures(features, kept, skipped)


class BenchmarkFeatures:
    """The features of a benchmark's splits for one model, each split (and subsample) extracted once.

    Protocols ask for the splits they need; the evaluated split (`split`, `max_samples`,
    `seed`) is what a call without arguments returns, so zero-shot and the linear probe's test
    set share one extraction. `requested` lists, in order, the splits asked for since it was
    last cleared: the ones a protocol's metrics rest on.
    """

    def __init__(
        self,
        model: FlipModel,
        benchmark: Benchmark,
        split: str | None = None,
        max_samples: int | None = None,
        seed: int = 0,
        model_id: str | None = None,
        cache: FeatureCache | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        self.model, self.benchmark = model, benchmark
        self.evaluated = (split or benchmark.test_split, max_samples, seed)
        self.model_id, self.cache = model_id, cache
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.requested: list[SplitFeatures] = []
        self._extracted: dict[tuple[str, int | None, int, bool], SplitFeatures] = {}

    def __call__(
        self, split: str | None = None, max_samples: int | None = None, seed: int = 0, flip: bool = False
    ) -> SplitFeatures:
        """Features of `split` (a seeded subsample of `max_samples`), or of the evaluated split;
        `flip`: flip-summed features (verification's flip test)."""
        key = (*(self.evaluated if split is None else (split, max_samples, seed)), flip)
        if key not in self._extracted:
            labelled = self.benchmark.load(*key[:3])
            self._extracted[key] = split_features(
                self.model,
                labelled,
                self.model_id,
                self.cache,
                self.batch_size,
                self.num_workers,
                self.progress,
                flip,
            )
        found = self._extracted[key]
        if all(found is not seen for seen in self.requested):
            self.requested.append(found)
        return found
