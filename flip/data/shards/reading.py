"""The one way FLIP reads a webdataset shard: only the members it uses, with decoders that run no code.

Shards come from the internet (img2dataset downloads, shared datasets), so a member is data,
never code. webdataset's default decoders map extensions such as `.pyd`, `.pickle`, `.pkl`
and `.pth` to `pickle.loads` and `torch.load(weights_only=False)`; every FLIP reader
(training, validation, evaluation and benchmark shards, flip-data inputs) goes through this
module instead, which knows three kinds of member and nothing else:

- images (`IMAGE_EXTS`), decoded by PIL;
- captions (`TEXT_EXTS`), decoded as UTF-8;
- metadata (`JSON_EXTS`), decoded by `json.loads`.

Every other member is skipped unread, whatever its name.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import IO, Any

from PIL import Image

__all__ = [
    "IMAGE_EXTS",
    "JSON_EXTS",
    "TEXT_EXTS",
    "WANTED_EXTS",
    "SampleError",
    "ShardError",
    "decode_caption",
    "decode_image",
    "decode_json",
    "decode_sample",
    "iter_tar_samples",
    "not_a_tar",
    "split_member_name",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "text", "caption")
JSON_EXTS = ("json",)
WANTED_EXTS = frozenset((*IMAGE_EXTS, *TEXT_EXTS, *JSON_EXTS))

_TAR_BLOCK = 512
# webdataset's sample key: the member's folder and its file name up to the first dot
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


class ShardError(Exception):
    """A whole shard (or its rest) cannot be read; `reason` is the short name a skip is counted under."""

    def __init__(self, reason: str, url: str, detail: str) -> None:
        super().__init__(f"{url}: {detail}")
        self.reason, self.url, self.detail = reason, url, detail


class SampleError(Exception):
    """One sample cannot be used; `reason` is the short name a skip is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def split_member_name(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a tar member, as webdataset groups members into samples."""
    match = _MEMBER_NAME.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


def not_a_tar(head: bytes) -> str | None:
    """Why a file whose first bytes are `head` is no tar (None when it may be one, compressed or not).

    tarfile reports a file that is no tar at all and a tar cut short alike ("unexpected end
    of data", "invalid header"); the first header block tells them apart.
    """
    if not head:
        return "is empty, not a tar file"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return None  # compressed: tarfile opens it and finds out
    try:
        block = head[:_TAR_BLOCK].ljust(_TAR_BLOCK, b"\0")
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return f"is not a tar file (it starts with {head[:16]!r}, not a tar header)"
    return None


def _open(url: str) -> tuple[IO[bytes], bytes]:
    """The shard as a byte stream, and its first block (which tells a tar from anything else)."""
    if "://" in url or url.startswith("pipe:"):
        from webdataset.gopen import gopen  # remote and piped shards, as training streams them

        stream = gopen(url, "rb")
    else:
        stream = open(url, "rb")  # noqa: SIM115 - closed by the caller
    head = stream.read(_TAR_BLOCK)
    return stream, head


class _Prefixed(io.RawIOBase):
    """A read-once stream with its already-read first bytes put back in front."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            count = min(len(buffer), len(self.head))
            buffer[:count], self.head = self.head[:count], self.head[count:]
            return count
        data = self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def iter_tar_samples(
    url: str, read_data: bool = True, wanted: frozenset[str] = WANTED_EXTS
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of one shard, in order; only `wanted` members are read.

    Members of one sample are consecutive, as webdataset's writers and img2dataset store them.
    Raises `ShardError` for a file that is not a tar (`not_a_tar`, before any sample) or whose
    rest cannot be read (`truncated_tar`, after the samples before the damage). Compressed
    tars (`.tar.gz`) are read too. With `read_data=False` the values are empty: a structural
    pass that reads headers only.
    """
    try:
        stream, head = _open(url)
    except OSError as exc:
        raise ShardError("unreadable_shard", url, f"cannot be opened ({exc})") from exc
    with stream:
        problem = not_a_tar(head)
        if problem is not None:
            raise ShardError("not_a_tar", url, problem)
        key, fields = None, {}
        try:
            with tarfile.open(fileobj=_Prefixed(head, stream), mode="r|*") as tar:
                for member in tar:
                    parts = split_member_name(member.name) if member.isfile() else None
                    if parts is None:
                        continue
                    member_key, ext = parts
                    if member_key != key:
                        if fields:
                            yield key, fields
                        key, fields = member_key, {}
                    if ext not in wanted or ext in fields:
                        continue  # never read, never decoded
                    data = b""
                    if read_data:
                        handle = tar.extractfile(member)
                        data = handle.read() if handle is not None else b""
                        if len(data) != member.size:
                            raise EOFError(f"member {member.name!r} is cut short")
                    fields[ext] = data
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            early = isinstance(exc, EOFError) or "end of" in str(exc).lower()
            detail = "ends early" if early else "is damaged"
            raise ShardError("truncated_tar", url, f"{detail} after sample {key!r} ({exc})") from exc
        if fields:
            yield key, fields


def decode_image(data: bytes) -> Image.Image:
    """An RGB image decoded (fully, so that a truncated file fails here) by PIL."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def decode_caption(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError("non_utf8_caption", f"the caption is not UTF-8 ({exc})") from exc


def decode_json(data: bytes) -> Any:
    return json.loads(data)


def _first(fields: dict[str, bytes], exts: Sequence[str]) -> bytes | None:
    return next((fields[e] for e in exts if e in fields), None)


def decode_sample(fields: dict[str, bytes], with_json: bool = False) -> dict[str, Any]:
    """{"image": PIL image, "text": caption} (and "json" when asked and present) of one sample.

    Raises `SampleError` (or PIL's error for a bad image) naming what is missing or undecodable.
    The caption is decoded first: it is the cheap check.
    """
    text, image = _first(fields, TEXT_EXTS), _first(fields, IMAGE_EXTS)
    if image is None or text is None:
        missing = "an image (" + "/".join(IMAGE_EXTS) + ")" if image is None else "a caption"
        raise SampleError("missing_field", f"the sample has no {missing}; members: {sorted(fields)}")
    sample: dict[str, Any] = {"text": decode_caption(text), "image": decode_image(image)}
    if with_json and "json" in fields:
        try:
            sample["json"] = decode_json(fields["json"])
        except ValueError as exc:
            raise SampleError("bad_json", f"the .json is not JSON ({exc})") from exc
    return sample
