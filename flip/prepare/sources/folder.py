"""`flip-data folder`: a directory of images plus a captions table.

The table (CSV, TSV, JSONL or parquet) has one row per (image, caption); an image with many
captions appears in many rows, or holds a list of captions in one cell (JSONL, parquet).
Image paths are relative to the image folder (or absolute). Each image becomes one sample
per caption (`--multi-caption each`, keys `{key}_0`, `{key}_1`, ...) or one sample with its
first caption and all of them in the `.json` (`first`). Other columns of the image's first
row go into the `.json`. Images in the folder that no row mentions are counted as
`missing_caption`; rows naming an image that does not exist are counted as `missing_image`;
a row repeating an earlier row's image and caption is counted as `duplicate_row`.

Keys come from the path (see `flip.prepare.keys`): `bob.jpg` is `bob`, and a path that
a key cannot spell (`alice/001.jpg`, `a b.jpg`, `张三.jpg`) keeps a readable form plus a hash
of the path, so distinct images never share a key. The table is checked (it exists, has
rows, the columns are there and named once) when the source is made, before any output is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flip.data.shards import is_image_file
from flip.prepare.keys import disambiguate, safe_key
from flip.prepare.report import SkipLog
from flip.prepare.sources.tables import (
    clean_captions,
    json_safe,
    pick_column,
    read_rows,
    table_columns,
)
from flip.prepare.writer import RESERVED_KEYS, ImageRef, Item

__all__ = ["FolderSource", "key_from_path"]

IMAGE_COLUMNS = ("file_name", "image", "filename", "filepath", "path", "image_path")
CAPTION_COLUMNS = ("caption", "text", "captions")
MULTI_CAPTION = ("each", "first")


def key_from_path(relative: str) -> str:
    """The key of an image's relative path: its stem when that is a valid key (`bob.jpg` -> `bob`),
    else a readable form plus a hash of the whole path (`alice/001.jpg` -> `alice_001_<8 hex>`)."""
    stem = relative.rsplit(".", 1)[0] if "." in os.path.basename(relative) else relative
    return safe_key(stem.replace("\\", "/").strip("/"), identity=relative)


@dataclass
class _Image:
    path: str
    key: str
    where: str
    captions: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FolderSource:
    images: Path
    captions: Path
    image_column: str | None = None
    caption_column: str | None = None
    key_column: str | None = None
    multi_caption: str = "each"
    command: str = "folder"

    def __post_init__(self) -> None:
        self.images, self.captions = Path(self.images), Path(self.captions)
        if not self.images.is_dir():
            raise FileNotFoundError(f"image folder {str(self.images)!r} does not exist")
        if self.multi_caption not in MULTI_CAPTION:
            raise ValueError(f"multi_caption={self.multi_caption!r}; accepted: {', '.join(MULTI_CAPTION)}")
        names = table_columns(self.captions)  # missing file, empty table, repeated names: fail now
        self._columns = (
            pick_column(names, self.image_column, IMAGE_COLUMNS, "image", self.captions),
            pick_column(names, self.caption_column, CAPTION_COLUMNS, "caption", self.captions),
        )
        if self.key_column is not None:
            pick_column(names, self.key_column, (), "key", self.captions)
        self._count: int | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "images": str(self.images),
            "captions": str(self.captions),
            "image_column": self.image_column,
            "caption_column": self.caption_column,
            "key_column": self.key_column,
            "multi_caption": self.multi_caption,
        }

    def _relative(self, value: str) -> str:
        path = Path(value.strip())
        if path.is_absolute():
            try:
                return path.relative_to(self.images.resolve()).as_posix()
            except ValueError:
                return path.as_posix()
        return Path(os.path.normpath(path)).as_posix()

    def _group(self, skips: SkipLog) -> list[_Image]:
        """Rows grouped by image, in order of first appearance; bad rows and captions counted."""
        images: dict[str, _Image] = {}
        image_col, caption_col = self._columns  # the first good row's (a CSV header, a JSONL object)
        for where, row, problem in read_rows(self.captions):
            if row is None:
                skips.add("bad_row", where, problem)
                continue
            value = row.get(image_col)
            if not isinstance(value, str) or not value.strip():
                skips.add("bad_row", where, f"no image path in column {image_col!r} ({value!r})")
                continue
            relative = self._relative(value)
            entry = images.get(relative)
            if entry is None:
                key = key_from_path(relative)
                if self.key_column is not None:
                    raw = row.get(self.key_column)
                    if raw is None or not str(raw).strip():
                        skips.add("bad_row", where, f"no key in column {self.key_column!r}")
                        continue
                    key = safe_key(str(raw).strip())
                extra = {
                    (f"extra_{k}" if k in RESERVED_KEYS else k): json_safe(v)
                    for k, v in row.items()
                    if k not in (image_col, caption_col, self.key_column)
                }
                entry = images[relative] = _Image(relative, key, where, extra=extra)
            for text, skip in clean_captions(row.get(caption_col)):
                if skip is not None:
                    skips.add(skip.reason, where, f"{relative}: {skip.detail}")
                elif text in entry.captions:
                    skips.add("duplicate_row", where, f"{relative}: caption {text[:60]!r} already listed")
                else:
                    entry.captions.append(text)
        listed = set(images)
        for relative in self._scan():
            if relative not in listed:
                skips.add("missing_caption", relative, "no row of the captions file names this image")
        return [entry for entry in images.values() if entry.captions]

    def _scan(self) -> Iterator[str]:
        for directory, subdirs, files in os.walk(self.images):
            subdirs.sort()
            for name in sorted(files):
                if is_image_file(name):
                    yield Path(os.path.relpath(os.path.join(directory, name), self.images)).as_posix()

    def total(self) -> int | None:
        """Known once `items` has read the captions table (it groups all rows first): the items
        it yields plus the rows and images skipped while grouping."""
        return self._count

    def items(self, skips: SkipLog) -> Iterator[Item]:
        before = skips.total
        entries = self._group(skips)
        planned: list[tuple[_Image, int | None]] = []  # (image, caption index or None for one sample)
        for entry in entries:
            if self.multi_caption == "first" or len(entry.captions) == 1:
                planned.append((entry, None))
            else:
                planned.extend((entry, index) for index in range(len(entry.captions)))
        self._count = len(planned) + skips.total - before
        keys = [entry.key if index is None else f"{entry.key}_{index}" for entry, index in planned]
        if self.key_column is None:  # derived keys that still meet (a.jpg/a.png, a_0.jpg/a.jpg#0)
            identities = [
                entry.path if index is None else f"{entry.path}#{index}" for entry, index in planned
            ]
            keys = disambiguate(keys, identities)
        for key, (entry, index) in zip(keys, planned, strict=True):
            path = Path(entry.path)
            ref = ImageRef(str(path if path.is_absolute() else self.images / path))
            metadata = {**entry.extra, "image_path": entry.path}
            if index is None:
                if len(entry.captions) > 1:
                    metadata["captions"] = entry.captions
                yield Item(key, ref, entry.captions[0], metadata)
            else:
                yield Item(key, ref, entry.captions[index], {**metadata, "caption_index": index})
