"""How FLIP writes a shard: the same samples always give the same bytes, and a shard is whole or absent.

Both writers (the FaceShapes generator and flip-data) decide from a fingerprint of their
inputs and settings whether shards on disk are still current, and tests compare shards byte
for byte; so member metadata is fixed (mtime, owner, mode) instead of taken from the clock
and the user, and the fingerprint is one function of JSON-able settings. A shard is written
beside its final name and renamed onto it when complete (`flip.atomic`), so a killed run
never leaves a half-written `.tar` that a later run or a reader would take for a whole one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from typing import Any

from flip.atomic import atomic_file

__all__ = ["PAX_MTIME", "TAR_MTIME", "fingerprint", "write_shard"]

# an int: a float mtime makes tarfile write a PAX header before every member, which every
# reader then has to parse (its cost: docs/data.md, "Why FaceShapes looks the way it does")
TAR_MTIME = 0
# the float flip-data's shards have carried since its writer's VERSION 1: their bytes (and so
# their PAX headers) stay as they are until that VERSION is bumped, then TAR_MTIME serves both
PAX_MTIME = 0.0
_OWNER = "flip"
_MODE = 0o444  # members are data: read-only for everyone, once extracted


def write_shard(
    path: str | os.PathLike, samples: Iterable[Mapping[str, Any]], mtime: int | float = TAR_MTIME
) -> int:
    """Writes `samples` (webdataset dicts of `__key__` and extension -> bytes) as the tar `path`.

    Members are stored per sample in sorted extension order, with fixed metadata, as
    webdataset's `TarWriter(encoder=False)` stores them (keys starting with `_` are not
    stored); tarfile is used directly because importing webdataset imports torch, which
    every worker process would pay for. Returns the number of samples written; `samples`
    may be a generator that leaves out the ones it cannot make. On any error nothing is left
    at `path` (an older file there stays).
    """
    written = 0
    with atomic_file(path, "wb") as stream, tarfile.open(fileobj=stream, mode="w|") as tar:
        for sample in samples:
            _add_sample(tar, sample, mtime)
            written += 1
    return written


def _add_sample(tar: tarfile.TarFile, sample: Mapping[str, Any], mtime: int | float) -> None:
    if "__key__" not in sample:
        raise ValueError(f"a sample needs a '__key__'; it has only {sorted(sample)}")
    key = sample["__key__"]
    members = {ext: data for ext, data in sorted(sample.items()) if not ext.startswith("_")}
    for ext, data in members.items():  # all checked before any is written
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"sample {key!r}: member {ext!r} is {type(data).__name__}; expected bytes")
    for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), mtime, _MODE
        info.uname = info.gname = _OWNER
        tar.addfile(info, io.BytesIO(data))


def fingerprint(parts: Iterable[Any], length: int) -> str:
    """The first `length` hex digits of a SHA-256 over the JSON of each part (sorted keys; str() for
    anything JSON cannot write): equal settings and inputs give equal fingerprints in any process."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()[:length]
