"""The one way FLIP reads a webdataset shard: only the members it uses, with decoders that run no code.

Shards come from the internet (img2dataset downloads, shared datasets), so a member is data,
never code. webdataset's default decoders map extensions such as `.pyd`, `.pickle`, `.pkl`
and `.pth` to `pickle.loads` and `torch.load(weights_only=False)`; every FLIP reader
(training, validation, evaluation and benchmark shards, flip-data inputs, the FaceShapes
preview) goes through this module instead, which knows three kinds of member (`format`) and
nothing else:

- images (`IMAGE_EXTENSIONS`), decoded by PIL;
- captions (`CAPTION_EXTENSIONS`), decoded as UTF-8;
- metadata (`METADATA_EXTENSIONS`), decoded by `json.loads`.

Every other member is skipped unread, whatever its name.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from PIL import Image

from flip.data.shards.format import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    METADATA_MEMBER,
    WANTED_EXTENSIONS,
    split_member_name,
)
from flip.data.shards.tar_stream import READ_ERRORS, TarStream, decompressed

__all__ = [
    "MemberSpan",
    "SampleError",
    "ShardError",
    "TarIndex",
    "decode_caption",
    "decode_image",
    "decode_json",
    "decode_sample",
    "iter_tar_samples",
    "locate_members",
    "not_a_tar",
    "pick",
]

_TAR_BLOCK = 512
V = TypeVar("V")


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
    """The shard as a byte stream from its start, and its first block (which tells a tar from
    anything else): a local file is read again from its start, a stream has the block put back."""
    if "://" in url or url.startswith("pipe:"):
        from webdataset.gopen import gopen  # remote and piped shards, as training streams them

        stream = gopen(url, "rb")
        head = stream.read(_TAR_BLOCK)
        return _Prefixed(head, stream), head
    stream = open(url, "rb")  # noqa: SIM115 - closed by the caller
    head = stream.read(_TAR_BLOCK)
    stream.seek(0)
    return stream, head


class _Prefixed(io.RawIOBase):
    """A read-once stream with its already-read first bytes put back in front."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.rest.close()
        super().close()

    def readinto(self, buffer) -> int:
        if self.head:
            count = min(len(buffer), len(self.head))
            buffer[:count], self.head = self.head[:count], self.head[count:]
            return count
        data = self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def iter_tar_samples(
    url: str, read_data: bool = True, wanted: Collection[str] = WANTED_EXTENSIONS
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
            tar = TarStream(decompressed(stream, head))
            for name, is_file in tar:
                parts = split_member_name(name) if is_file else None
                if parts is None:
                    continue
                member_key, ext = parts
                if member_key != key:
                    if fields:
                        yield key, fields
                    key, fields = member_key, {}
                if ext not in wanted or ext in fields:
                    continue  # never read, never decoded
                fields[ext] = tar.read() if read_data else b""
        except READ_ERRORS as exc:
            early = isinstance(exc, EOFError) or "end of" in str(exc).lower()
            detail = "ends early" if early else "is damaged"
            raise ShardError("truncated_tar", url, f"{detail} after sample {key!r} ({exc})") from exc
        if fields:
            yield key, fields


@dataclass(frozen=True)
class MemberSpan:
    """Where one member's bytes lie inside an uncompressed tar file, to be read later by offset."""

    name: str
    offset: int
    size: int


@dataclass
class TarIndex:
    """What `locate_members` found in one tar: spans per sample key and extension, the bytes of the
    members it was asked to read, and what was wrong with the tar (a skip reason, or None)."""

    spans: dict[str, dict[str, MemberSpan]] = field(default_factory=dict)
    data: dict[str, dict[str, bytes]] = field(default_factory=dict)
    problem: str | None = None


def locate_members(path: str | os.PathLike, wanted: Collection[str], read: Collection[str]) -> TarIndex:
    """Where each `wanted` member of an uncompressed tar lies, reading the bytes of the `read` ones only.

    For indexing a large tar whose images are fetched later by offset (flip-data's
    facecaption15m joins img2dataset downloads this way): images are seeked past, not read.
    Members are grouped by sample key across the whole tar; a later member of the same key and
    extension replaces an earlier one. `problem` is `not_a_tar` (nothing indexed) or
    `truncated_tar` (the members before the damage are indexed).
    """
    file_size = os.path.getsize(path)
    found = TarIndex()
    try:
        with open(path, "rb") as f:
            if not_a_tar(f.read(_TAR_BLOCK)) is not None:
                found.problem = "not_a_tar"
                return found
    except OSError:
        found.problem = "not_a_tar"
        return found
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > file_size:
                    found.problem = "truncated_tar"
                    break
                parts = split_member_name(info.name)
                if parts is None or parts[1] not in wanted:
                    continue
                key, ext = parts
                found.spans.setdefault(key, {})[ext] = MemberSpan(info.name, info.offset_data, info.size)
                if ext in read:
                    handle = tar.extractfile(info)
                    found.data.setdefault(key, {})[ext] = handle.read() if handle is not None else b""
    except (tarfile.ReadError, EOFError, OSError):
        found.problem = "truncated_tar"
    return found


def decode_image(data: bytes, at_least: tuple[int, int] | None = None) -> Image.Image:
    """An RGB image decoded (fully, so that a truncated file fails here) by PIL.

    With `at_least` (width, height), a JPEG at least twice that size on both sides decodes at
    1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: less to decode and less to resize later),
    never below `at_least`; its stored size is then in `image.info["full_size"]`.
    """
    with Image.open(io.BytesIO(data)) as image:
        full_size = image.size
        if at_least is not None and min(full_size[0] // at_least[0], full_size[1] // at_least[1]) >= 2:
            image.draft("RGB", at_least)
        image.load()
        rgb = image.convert("RGB")
    if rgb.size != full_size:
        rgb.info["full_size"] = full_size
    return rgb


def decode_caption(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError("non_utf8_caption", f"the caption is not UTF-8 ({exc})") from exc


def decode_json(data: bytes) -> Any:
    return json.loads(data)


def pick(members: Mapping[str, V], extensions: Sequence[str]) -> V | None:
    """The member of the first of `extensions` that a sample has (None when it has none of them)."""
    return next((members[e] for e in extensions if e in members), None)


def decode_sample(
    fields: dict[str, bytes], with_json: bool = False, at_least: tuple[int, int] | None = None
) -> dict[str, Any]:
    """{"image": PIL image, "text": caption} (and "json" when asked and present) of one sample.

    `at_least` lets a large JPEG decode at reduced scale (`decode_image`); the image's stored
    (width, height) is then in "full_size".

    Raises `SampleError` (or PIL's error for a bad image) naming what is missing or undecodable.
    The caption is decoded first: it is the cheap check.
    """
    text, image = pick(fields, CAPTION_EXTENSIONS), pick(fields, IMAGE_EXTENSIONS)
    if image is None or text is None:
        missing = "an image (" + "/".join(IMAGE_EXTENSIONS) + ")" if image is None else "a caption"
        raise SampleError("missing_field", f"the sample has no {missing}; members: {sorted(fields)}")
    sample: dict[str, Any] = {"text": decode_caption(text), "image": decode_image(image, at_least)}
    if "full_size" in sample["image"].info:
        sample["full_size"] = sample["image"].info["full_size"]
    if with_json and METADATA_MEMBER in fields:
        try:
            sample["json"] = decode_json(fields[METADATA_MEMBER])
        except ValueError as exc:
            raise SampleError("bad_json", f"the .json is not JSON ({exc})") from exc
    return sample
