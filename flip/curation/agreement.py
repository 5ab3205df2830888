"""Image-text agreement: the cosine a CLIP-style model gives each (image, caption) pair.

Any model `flip.load` reads (a FLIP checkpoint or export folder) or an open_clip architecture
with its weights. Features come from the evaluation code's extractors
(`flip.evaluation.features`), the loop every benchmark goes through, so a score here is the
similarity zero-shot evaluation would compute. Scores are rounded to 6 decimals once, so the
number stored in a sample's `.json`, the one compared with `--min-agreement` and the one cached
for a rerun are the same number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flip.benchmarks.base import EncodedImages
from flip.curation.scan import Sample
from flip.data.shards import fingerprint
from flip.evaluation.features import (
    extract_image_features,
    extract_text_features,
    model_identity,
    resolve_device,
)
from flip.models import FlipModel

__all__ = ["Scorer", "load_scorer"]

SCORE_VERSION = "1"
DECIMALS = 6


@dataclass
class Scorer:
    """A model that scores pairs, what identifies it in caches, and how it batches."""

    model: FlipModel
    identity: str
    batch_size: int = 64
    keep_features: bool = False

    def fingerprint(self, shard_digest: str) -> str:
        return fingerprint([SCORE_VERSION, self.identity, self.keep_features, shard_digest], 20)

    @torch.no_grad()
    def score(self, path: str | os.PathLike, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores [N] (NaN where a sample has a problem or its image cannot be encoded) and, when
        `keep_features`, the L2-normalised image features [N, D] (float16, NaN rows likewise)."""
        usable = [i for i, s in enumerate(samples) if s.problem is None]
        scores = np.full(len(samples), np.nan)
        features = None
        if not usable:
            return scores, features
        blobs = []
        with open(path, "rb") as f:
            for i in usable:
                f.seek(samples[i].offset)
                blobs.append(f.read(samples[i].size))
        names = tuple(f"{path}#{samples[i].member}" for i in usable)
        try:
            images, kept = extract_image_features(
                self.model, EncodedImages(tuple(blobs), names), self.batch_size, progress=False
            )
        except ValueError:  # none of them could be encoded (each one is logged)
            return scores, features
        rows = [usable[k] for k in kept]
        texts = extract_text_features(self.model, [samples[i].caption for i in rows], self.batch_size)
        scores[rows] = np.round((images * texts).sum(-1).double().numpy(), DECIMALS)
        if self.keep_features:
            features = np.full((len(samples), images.shape[1]), np.nan, dtype=np.float16)
            features[rows] = images.numpy().astype(np.float16)
        return scores, features


def load_scorer(
    ckpt: str | None = None,
    open_clip: str | None = None,
    pretrained: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    keep_features: bool = False,
) -> Scorer:
    """The scoring model: a FLIP checkpoint or export folder (`ckpt`, read weights-only by
    `flip.load`), or an open_clip architecture (`open_clip`) with a pretrained tag or file."""
    where = resolve_device(device)
    if ckpt is not None:
        from flip.checkpoint import load

        if not Path(ckpt).exists():
            raise FileNotFoundError(
                f"--model {ckpt!r} does not exist; give a FLIP checkpoint or export folder"
            )
        return Scorer(load(ckpt, device=where), model_identity(ckpt=ckpt), batch_size, keep_features)
    if open_clip is None:
        raise ValueError("a scoring model needs --model CKPT or --open-clip ARCH")
    from flip.models.baselines import load_baseline

    spec = {"format": "open_clip", "name": open_clip, "pretrained": pretrained}
    model = load_baseline(spec).model.to(where).eval()
    return Scorer(model, model_identity(name=open_clip, pretrained=pretrained), batch_size, keep_features)
