"""Duplicate images for `flip-data curate`: exact (same pixels), near (perceptual hash) and
semantic (embedding cosine), each keeping the first copy in input order.

- Exact: a SHA-256 of the decoded RGB pixels and the size, so the same picture stored as PNG
  and as BMP, or as two JPEG files differing only in metadata, is one image.
- Near: `imagehash`'s perceptual hashes (64 bits: `phash` the DCT hash, `dhash` the gradient
  hash). A re-encoded, resized or slightly brightened copy lands a few bits away from its
  original; two different faces land tens of bits apart (docs/data.md has the measured
  distances). Candidates are found by multi-index hashing (`NearDuplicates`), an exact search
  that compares a query with a small share of the kept hashes and misses none.
- Semantic: cosine of L2-normalised image embeddings (any model), compared block by block:
  quadratic in the number of images, for collections up to a few hundred thousand.

Every search is greedy in input order: an image is a duplicate when it is close to an earlier
image that was kept, never to one that was itself dropped, so chains (A~B, B~C, A!~C) keep
A and C.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence

import imagehash
import numpy as np
from PIL import Image

__all__ = ["HASHES", "NearDuplicates", "embedding_duplicates", "hamming", "perceptual_hash", "pixel_digest"]

HASHES = {"phash": imagehash.phash, "dhash": imagehash.dhash}
BITS = 64
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def pixel_digest(image: Image.Image) -> str:
    """SHA-256 (32 hex digits) of an RGB image's size and pixels."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\0".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:32]


def perceptual_hash(image: Image.Image, kind: str = "phash") -> int:
    """The image's 64-bit perceptual hash as an int (`kind`: a key of HASHES)."""
    if kind not in HASHES:
        raise ValueError(f"hash {kind!r}; accepted: {', '.join(HASHES)}")
    return int(str(HASHES[kind](image)), 16)


def hamming(a: np.ndarray, b: int) -> np.ndarray:
    """Bits in which each hash of `a` (uint64) differs from `b`."""
    diff = np.ascontiguousarray(a ^ np.uint64(b), dtype=np.uint64)
    return _POPCOUNT[diff.view(np.uint8)].reshape(-1, 8).sum(axis=1)


def _masks(width: int, radius: int) -> list[int]:
    """Every `width`-bit XOR mask with at most `radius` bits set."""
    return [
        sum(1 << b for b in bits)
        for k in range(radius + 1)
        for bits in itertools.combinations(range(width), k)
    ]


def _plan(max_distance: int, reference: int = 1_000_000) -> int:
    """How many bands to cut the hash into: the fewest lookups plus candidate comparisons for a
    collection of `reference` hashes (each band of b bits is searched within r = d // m bits)."""

    def cost(bands: int) -> float:
        width, radius = BITS // bands, max_distance // bands
        lookups = bands * len(_masks(width, radius)) if radius <= 3 else math.inf
        return lookups + reference * lookups / 2.0**width / 10  # a comparison is cheap (numpy)

    return min(range(1, max_distance + 2), key=cost)


class NearDuplicates:
    """The kept images' hashes, searchable for one within `max_distance` bits: an exact search.

    Multi-index hashing (Norouzi et al., 2012): the 64 bits are cut into m bands, and two hashes
    within d bits differ in at most d // m bits of some band (pigeonhole: otherwise every band
    differs in more, d + 1 bits or more in all). A query looks its bands up within that radius
    (every XOR mask of up to d // m bits) and compares only the hashes found. m is chosen per d
    to keep both the lookups and the candidates few (d = 8: 3 bands of 21-22 bits, radius 2).
    """

    def __init__(self, max_distance: int) -> None:
        if not 0 <= max_distance <= 31:
            raise ValueError(f"max_distance={max_distance}; accepted: 0..31 bits of {BITS}")
        self.max_distance = max_distance
        bands = _plan(max_distance)
        edges = np.linspace(0, BITS, bands + 1).round().astype(int)
        self.bands = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in itertools.pairwise(edges)]
        radius = max_distance // bands
        self.masks = [_masks(int(hi - lo), radius) for lo, hi in itertools.pairwise(edges)]
        self.buckets: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.hashes = np.zeros(1024, dtype=np.uint64)  # grown by doubling; the first `len(ids)` used
        self.ids: list[int] = []

    def find(self, value: int) -> int | None:
        """The id of the earliest kept image within `max_distance` bits of `value`, or None."""
        found: list[int] = []
        for (lo, mask), masks, bucket in zip(self.bands, self.masks, self.buckets, strict=True):
            band = (value >> lo) & mask
            for slots in map(bucket.get, [band ^ m for m in masks]):
                if slots:
                    found += slots
        if not found:
            return None
        slots = np.unique(np.asarray(found, dtype=np.int64))
        close = slots[hamming(self.hashes[slots], value) <= self.max_distance]
        return self.ids[int(close[0])] if len(close) else None

    def add(self, value: int, id_: int) -> None:
        slot = len(self.ids)
        if slot == len(self.hashes):
            self.hashes = np.concatenate([self.hashes, np.zeros_like(self.hashes)])
        self.hashes[slot] = value
        self.ids.append(id_)
        for (lo, mask), bucket in zip(self.bands, self.buckets, strict=True):
            bucket.setdefault((value >> lo) & mask, []).append(slot)


def embedding_duplicates(
    features: np.ndarray, min_cosine: float, groups: Sequence[object] | None = None, block: int = 1024
) -> dict[int, int]:
    """{row: the earlier kept row it duplicates} for rows of `features` (L2-normalised, in input
    order) whose cosine with an earlier kept row is >= `min_cosine` (within the same group)."""
    if not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine={min_cosine}; accepted: -1..1")
    x = np.asarray(features, dtype=np.float32)
    earlier: list[list[int]] = [[] for _ in range(len(x))]
    for start in range(0, len(x), block):
        rows = x[start : start + block]
        sims = rows @ x[: start + len(rows)].T
        for offset, row in enumerate(sims):
            i = start + offset
            close = np.flatnonzero(row[:i] >= min_cosine)
            earlier[i] = [int(j) for j in close if groups is None or groups[j] == groups[i]]
    duplicates: dict[int, int] = {}
    for i, candidates in enumerate(earlier):
        kept = next((j for j in candidates if j not in duplicates), None)
        if kept is not None:
            duplicates[i] = kept
    return duplicates
