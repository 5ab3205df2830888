"""The first pass of `flip-data curate`: every input sample read once, checked and hashed.

Each input shard becomes a list of `Sample`s: where its image lies in the tar (to be copied
later by offset), its caption and metadata, the digest of its pixels and its perceptual hash,
or the reason it cannot be used. Members are read through the shared safe reader
(`flip.data.shards.locate_members`: images, captions and `.json`, nothing that could run code),
images decoded with flip-data's defensive decoder (`flip.prepare.hygiene`) and captions checked
as every flip-data source checks them (`clean_caption`).

The result of a shard is cached under the output folder, named by a digest of the shard's
path, size and mtime and the scan settings: a killed run, or a rerun with other filter
thresholds, reads finished shards back instead of decoding them again.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flip.atomic import write_json_atomic
from flip.data.shards import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    METADATA_MEMBER,
    WANTED_EXTENSIONS,
    fingerprint,
    locate_members,
    not_a_tar,
    pick,
)
from flip.prepare.dedup import perceptual_hash, pixel_digest
from flip.prepare.hygiene import SkipSample, decode_image, to_rgb
from flip.prepare.keys import safe_key
from flip.prepare.sources.tables import clean_caption

__all__ = ["Sample", "ScanTask", "find_inputs", "read_cached", "samples_of", "scan_shard"]

SCAN_VERSION = "1"  # bump when what a scan records for the same shard changes


@dataclass
class Sample:
    """One input sample: where its image is, what it says, its hashes, or why it is unusable."""

    key: str
    member: str | None = None
    offset: int = 0
    size: int = 0
    caption: str | None = None
    metadata: dict[str, Any] | None = None
    pixels: str | None = None
    phash: str | None = None  # 16 hex digits
    problem: str | None = None
    detail: str = ""


def find_inputs(paths: list[Path]) -> list[Path]:
    """Shard files in order: files as given, folders replaced by their `*.tar` files (sorted).

    Refused, naming the path: a path that does not exist, a folder without `.tar` files, a
    compressed tar (curation copies images out by byte offset, which needs an uncompressed
    tar: decompress it first), a file given twice.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            shards = sorted(p for p in path.glob("*.tar") if p.is_file())
            if not shards:
                raise FileNotFoundError(f"input folder {str(path)!r} holds no .tar shard")
            found += shards
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(
                f"input {str(path)!r} does not exist; give shard files or folders of them"
            )
    seen: set[Path] = set()
    for shard in found:
        with open(shard, "rb") as f:
            head = f.read(6)
        if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
            raise ValueError(
                f"input {str(shard)!r} is a compressed tar; curate copies images out by byte offset, "
                "so it reads uncompressed .tar shards: decompress it first"
            )
        if shard.resolve() in seen:
            raise ValueError(f"input {str(shard)!r} is given twice")
        seen.add(shard.resolve())
    return found


@dataclass(frozen=True)
class ScanTask:
    """One input shard to scan, and where its result is cached."""

    index: int
    path: str
    cache: str
    hash_kind: str
    max_pixels: int

    @staticmethod
    def digest(path: Path, hash_kind: str, max_pixels: int) -> str:
        stat = path.stat()
        return fingerprint(
            [SCAN_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns, hash_kind, max_pixels], 20
        )


def _sample(key: str, spans: dict, data: dict[str, bytes], task: ScanTask) -> Sample:
    sample = Sample(safe_key(key))
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in spans), None)
    try:
        if image_ext is None:
            raise SkipSample("missing_image", f"{key}: no image member")
        span = spans[image_ext]
        sample.member, sample.offset, sample.size = span.name, span.offset, span.size
        sample.caption = clean_caption(pick(data, CAPTION_EXTENSIONS))
        if METADATA_MEMBER in data:
            try:
                metadata = json.loads(data[METADATA_MEMBER])
            except ValueError as exc:
                raise SkipSample("bad_json", f"{key}.json: {exc}") from None
            if not isinstance(metadata, dict):
                raise SkipSample("bad_json", f"{key}.json holds a {type(metadata).__name__}, not an object")
            sample.metadata = metadata
        image = to_rgb(decode_image(data[image_ext], task.max_pixels))
        sample.pixels = pixel_digest(image)
        sample.phash = f"{perceptual_hash(image, task.hash_kind):016x}"
    except SkipSample as skip:
        sample.problem, sample.detail = skip.reason, skip.detail
    return sample


def scan_shard(task: ScanTask) -> dict[str, Any]:
    """Scans one input shard and caches the result (in a worker or in the calling process).

    The result: {"samples": [Sample as dict, ...], "problem": None or `not_a_tar` /
    `truncated_tar` (the samples before the damage are still there), "detail": ...}.
    """
    problem, samples = None, []
    with open(task.path, "rb") as f:
        head_problem = not_a_tar(f.read(512))
    if head_problem is not None:
        problem = "not_a_tar"
    else:
        index = locate_members(task.path, WANTED_EXTENSIONS, WANTED_EXTENSIONS)
        problem = index.problem
        samples = [_sample(k, spans, index.data.get(k, {}), task) for k, spans in index.spans.items()]
    result = {
        "version": SCAN_VERSION,
        "input": task.path,
        "problem": problem,
        "detail": head_problem or ("the tar ends early; its complete members are used" if problem else ""),
        "samples": [asdict(s) for s in samples],
    }
    write_json_atomic(task.cache, result)
    return result


def read_cached(path: str | os.PathLike) -> dict[str, Any] | None:
    """A cached scan result, or None when there is none or it cannot be read (then scan again)."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("version") != SCAN_VERSION:
        return None
    return result


def samples_of(result: dict[str, Any]) -> list[Sample]:
    return [Sample(**record) for record in result["samples"]]
