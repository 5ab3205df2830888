"""A forward-only tar member reader for the training loop's hot path.

`tarfile` builds a full `TarInfo` per header (every field parsed, both checksum variants,
pax records decoded into attributes), and webdataset's `TarWriter` puts a pax header before
every member by default (a float mtime), so a shard of small JPEGs pays for two of those per
member, in the training process when loading runs there. Training needs a member's name and
whether it is a regular file; `TarStream` parses exactly that (and the size) from the 512-byte
headers (ustar, GNU and pax, including long names and sizes from pax records) and reads or
skips each member's data.

It is stricter than `tarfile` in a stream: a header block cut short or failing its checksum
is an error (`EOFError`, `ValueError`), where `tarfile` ends the archive there without one, so
a damaged shard is counted as damaged rather than read as a shorter one.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from collections.abc import Iterator
from typing import IO

__all__ = ["READ_ERRORS", "TarStream", "decompressed"]

# what reading a damaged, cut or wrongly compressed archive through this module can raise
READ_ERRORS = (EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = frozenset((b"0", b"\0", b"7"))  # tarfile's regular files, less GNU sparse ones
_PAX_LOCAL, _PAX_GLOBAL, _GNU_LONG_NAME, _GNU_LONG_LINK = b"x", b"g", b"L", b"K"
_NO_DATA = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))
_POSIX_MAGIC = b"ustar\x00"  # only POSIX ustar headers have the name prefix field


def decompressed(stream: IO[bytes], head: bytes) -> IO[bytes]:
    """`stream` (whose first bytes are `head`) decompressed when `head` says gzip, bzip2 or xz,
    the compressions `tarfile`'s "r|*" mode reads."""
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(stream, mode="rb")
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(stream, mode="rb")
    return stream


def _number(field: bytes) -> int:
    """A header's numeric field: octal digits (NUL or space terminated), or GNU's base-256."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_holds(block: bytes) -> bool:
    """The header's stored checksum is its bytes' sum (the field counted as spaces), unsigned or signed
    as old writers computed it; tarfile accepts either."""
    stored = _number(block[148:156])
    if stored == sum(block[:148]) + 256 + sum(block[156:]):
        return True
    signed = struct.unpack("148b8x356b", block)
    return stored == sum(signed) + 256


def _pax_records(data: bytes) -> dict[str, str]:
    """The `length key=value\\n` records of a pax header, as tarfile reads them."""
    records, position = {}, 0
    while position < len(data) and data[position] != 0:
        space = data.index(b" ", position)
        length = int(data[position:space])
        if length <= 0:
            raise ValueError(f"a pax record of length {length}")
        key, _, value = data[space + 1 : position + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


class TarStream:
    """The members of an uncompressed tar stream, in order, read once.

    Iterating yields `(name, is_file)` per member; until the next one is asked for,
    `read()` returns the current member's data. Data not read is skipped.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._pending = 0  # the current member's size, until its data (and padding) is read or skipped

    def _take(self, count: int) -> bytes:
        data = self._stream.read(count)
        while len(data) < count:  # a pipe or decompressor may return less than asked
            more = self._stream.read(count - len(data))
            if not more:
                break
            data += more
        return data

    def _skip(self, count: int) -> None:
        while count > 0:
            chunk = self._stream.read(min(count, 1 << 20))
            if not chunk:
                raise EOFError(f"the archive ends {count} bytes before the end of a member")
            count -= len(chunk)

    def _member_data(self, size: int) -> bytes:
        data, padding = self._take(size), -size % BLOCK
        if len(data) < size or (padding and len(self._take(padding)) < padding):
            raise EOFError("the archive ends inside a member's data")
        return data

    def read(self) -> bytes:
        """The current member's data (empty once read)."""
        data, self._pending = self._member_data(self._pending), 0
        return data

    def __iter__(self) -> Iterator[tuple[str, bool]]:
        long_name, pax = None, {}
        while True:
            self._skip(-(-self._pending // BLOCK) * BLOCK)
            self._pending = 0
            block = self._take(BLOCK)
            if not block or block == _ZERO_BLOCK:
                return  # the end (with or without the end-of-archive blocks)
            if len(block) < BLOCK:
                raise EOFError("the archive ends inside a header")
            if not _checksum_holds(block):
                raise ValueError("a header fails its checksum")
            kind, size = block[156:157], _number(block[124:136])
            if size < 0:  # GNU base-256 can write one; read(-n) would read the whole rest
                raise ValueError(f"a header gives a negative size ({size})")
            if kind == _PAX_LOCAL:
                pax.update(_pax_records(self._member_data(size)))
                continue
            if kind == _GNU_LONG_NAME:
                long_name = _text(self._member_data(size))
                continue
            if kind in (_PAX_GLOBAL, _GNU_LONG_LINK):
                self._member_data(size)
                continue
            name = _text(block[:100])
            if block[257:263] == _POSIX_MAGIC and block[345] != 0:
                name = f"{_text(block[345:500])}/{name}"
            name = pax.get("path", long_name if long_name is not None else name)
            size = int(pax["size"]) if "size" in pax else size
            if size < 0:
                raise ValueError(f"a pax header gives a negative size ({size})")
            if kind == b"5" or (kind == b"\0" and name.endswith("/")):  # a folder (V7 tar: a slash)
                kind, name = b"5", name.rstrip("/")
            if kind in _NO_DATA:
                size = 0  # links, devices, folders: tarfile reads no data after them, whatever the size field
            self._pending = size
            long_name, pax = None, {}
            yield name, kind in _REGULAR
