"""Training samples kept in memory after their first read, for datasets that fit.

A small dataset trained for many epochs (FaceShapes: 12,000 images resampled ~17 times) pays
for reading each tar and decoding each JPEG again on every pass, in the process that also
trains when there are no loader workers. `SampleCache` keeps each shard's raw samples and each
decoded image after the first time, so later passes start from decoded pixels. Output is the
same as without it: the cached image is the one the decoder produced, and every use gets a
copy, so no transform can change what the next epoch sees. It costs the decoded images'
memory (width x height x 3 bytes each), in every loader worker: use it when that fits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class SampleCache:
    """Per process: shard url -> its raw samples, and (url, key) -> the decoded sample."""

    def __init__(self) -> None:
        self._shards: dict[str, list[dict[str, Any]]] = {}
        self._decoded: dict[tuple[str, str], dict[str, Any]] = {}

    def shard(self, url: str) -> list[dict[str, Any]] | None:
        """The raw samples of a shard read through before, or None."""
        return self._shards.get(url)

    def keep_shard(self, url: str, samples: list[dict[str, Any]]) -> None:
        self._shards[url] = samples

    def decoded(self, url: str, key: str) -> dict[str, Any] | None:
        """A copy of the decoded sample, image included, or None when it was never decoded."""
        sample = self._decoded.get((url, key))
        return None if sample is None else {**sample, "image": sample["image"].copy()}

    def keep_decoded(self, url: str, key: str, sample: dict[str, Any]) -> None:
        self._decoded[(url, key)] = {**sample, "image": sample["image"].copy()}

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._decoded)
