"""Duplicate images for `flip-data curate`: exact (same pixels), near (perceptual hash) and
semantic (embedding cosine), each keeping the first copy in input order.

- Exact: a SHA-256 of the decoded RGB pixels and the size, so the same picture stored as PNG
  and as BMP, or as two JPEG files differing only in metadata, is one image.
- Near: `imagehash`'s perceptual hashes (64 bits: `phash` the DCT hash, `dhash` the gradient
  hash). A re-encoded, resized or slightly brightened copy lands a few bits away from its
  original; two different faces land tens of bits apart (docs/data.md has the measured
  distances). Candidates are found by multi-index hashing: the 64 bits are cut into
  `max_distance + 1` bands, and two hashes within `max_distance` bits agree exactly on at least
  one band (pigeonhole), so only hashes sharing a band are compared and none is missed.
- Semantic: cosine of L2-normalised image embeddings (any model), compared block by block:
  quadratic in the number of images, for collections up to a few hundred thousand.

Every search is greedy in input order: an image is a duplicate when it is close to an earlier
image that was kept, never to one that was itself dropped, so chains (A~B, B~C, A!~C) keep
A and C.
"""

from __future__ import annotations

import hashlib
import itertools
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


class NearDuplicates:
    """The kept images' hashes, searchable for one within `max_distance` bits (exact search)."""

    def __init__(self, max_distance: int) -> None:
        if not 0 <= max_distance <= 31:
            raise ValueError(f"max_distance={max_distance}; accepted: 0..31 bits of {BITS}")
        self.max_distance = max_distance
        edges = np.linspace(0, BITS, max_distance + 2).round().astype(int)
        self.bands = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in itertools.pairwise(edges)]
        self.buckets: list[dict[tuple, list[int]]] = [{} for _ in self.bands]
        self.hashes = np.zeros(1024, dtype=np.uint64)  # grown by doubling; the first `len(ids)` used
        self.ids: list[int] = []

    def _keys(self, value: int, group: object) -> list[tuple]:
        return [(group, (value >> lo) & mask) for lo, mask in self.bands]

    def find(self, value: int, group: object = None) -> int | None:
        """The id of the earliest kept image within `max_distance` of `value` (in the same
        `group`: e.g. the same caption), or None."""
        found: set[int] = set()
        for bucket, key in zip(self.buckets, self._keys(value, group), strict=True):
            found.update(bucket.get(key, ()))
        if not found:
            return None
        slots = np.fromiter(sorted(found), dtype=np.int64)
        close = slots[hamming(self.hashes[slots], value) <= self.max_distance]
        return self.ids[int(close[0])] if len(close) else None

    def add(self, value: int, id_: int, group: object = None) -> None:
        slot = len(self.ids)
        if slot == len(self.hashes):
            self.hashes = np.concatenate([self.hashes, np.zeros_like(self.hashes)])
        self.hashes[slot] = value
        self.ids.append(id_)
        for bucket, key in zip(self.buckets, self._keys(value, group), strict=True):
            bucket.setdefault(key, []).append(slot)


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
