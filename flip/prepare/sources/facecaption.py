"""`flip-data facecaption15m`: the FaceCaption-15M parquet joined with the images users fetched.

FaceCaption-15M publishes, per face, the url of the LAION-Face image it was found in, the
face box and a caption; the images themselves are fetched by the user with img2dataset
(`--url_col url --output_format webdataset`), which writes `NNNNN.tar` shards holding
`{key}.jpg` and a `{key}.json` that records the url and the image's sizes. Here every tar is
indexed (url -> byte range of its image), each parquet row is matched by url, its box is
mapped into the downloaded image's pixels and the face is cropped with a margin.

img2dataset resizes by default. `--resize-mode` says how the box is mapped: `auto` handles
images stored at their original size (`--resize_mode no`) or scaled uniformly
(`keep_ratio`); `border` and `center_crop` undo those modes' padding or cropping, which the
stored sizes alone cannot tell apart. A row whose box cannot be mapped is skipped as
`box_mismatch`, never cropped in the wrong place. With `--align` the mapped box is where the
landmark detector looks for the row's face (`flip.prepare.in_box`).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flip.data.shards import IMAGE_EXTENSIONS, METADATA_MEMBER, decode_json, locate_members, pick
from flip.data.workers import WorkerPool
from flip.prepare.hygiene import SkipSample
from flip.prepare.report import SkipLog
from flip.prepare.sources.tables import (
    clean_caption,
    json_safe,
    parquet_rows,
    read_rows,
    table_columns,
)
from flip.prepare.writer import RESERVED_KEYS, ImageRef, Item

__all__ = ["BOX_FORMATS", "RESIZE_MODES", "FaceCaptionSource", "index_tar", "map_box", "parse_box"]

BOX_FORMATS = ("xyxy", "xywh")
RESIZE_MODES = ("auto", "border", "center_crop")


@dataclass(frozen=True)
class Download:
    """An image inside an img2dataset tar, and the sizes img2dataset recorded for it."""

    tar: str
    member: str
    offset: int
    size: int
    width: int | None
    height: int | None
    original_width: int | None
    original_height: int | None


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def index_tar(path: str) -> tuple[dict[str, Download], str | None]:
    """url -> Download for every complete (image, json) pair in one img2dataset tar.

    Returns what was wrong with the tar, as a skip reason: None, `truncated_tar` (members
    before the damage are still indexed) or `not_a_tar`. Only the `.json` members are read
    here (by `json.loads`, through `flip.data.shards`), and only images are indexed; no other
    member is read.
    """
    found = locate_members(path, wanted=(*IMAGE_EXTENSIONS, METADATA_MEMBER), read=(METADATA_MEMBER,))
    index: dict[str, Download] = {}
    for key, spans in found.spans.items():
        image = pick(spans, IMAGE_EXTENSIONS)
        raw = found.data.get(key, {}).get(METADATA_MEMBER)
        if image is None or raw is None:
            continue
        try:
            meta = decode_json(raw)
        except ValueError:
            continue
        url = meta.get("url") if isinstance(meta, dict) else None
        if not isinstance(url, str) or url in index:
            continue
        index[url] = Download(
            path,
            image.name,
            image.offset,
            image.size,
            _int_or_none(meta.get("width")),
            _int_or_none(meta.get("height")),
            _int_or_none(meta.get("original_width")),
            _int_or_none(meta.get("original_height")),
        )
    return index, found.problem


def parse_box(value: Any, box_format: str) -> tuple[float, float, float, float]:
    """A box cell (list, array or its string form like '[12, 30, 140, 180]') as (x0, y0, x1, y1)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise SkipSample("bad_box", f"box {value[:60]!r} is not a list of 4 numbers") from None
    if isinstance(value, dict):
        value = [
            value.get(k) for k in (("x1", "y1", "x2", "y2") if box_format == "xyxy" else ("x", "y", "w", "h"))
        ]
    try:
        numbers = [float(v) for v in np.asarray(value, dtype=object).ravel()]
    except (TypeError, ValueError):
        raise SkipSample("bad_box", f"box {value!r} is not 4 numbers") from None
    if len(numbers) != 4 or not all(np.isfinite(numbers)):
        raise SkipSample("bad_box", f"box {value!r} is not 4 finite numbers")
    x0, y0, a, b = numbers
    x1, y1 = (a, b) if box_format == "xyxy" else (x0 + a, y0 + b)
    if x1 <= x0 or y1 <= y0:
        raise SkipSample("bad_box", f"box {value!r} ({box_format}) has no area")
    return x0, y0, x1, y1


def map_box(
    box: tuple[float, float, float, float], download: Download, mode: str
) -> tuple[float, float, float, float]:
    """The box (in original-image pixels) in the pixels of the image img2dataset stored."""
    w, h, ow, oh = download.width, download.height, download.original_width, download.original_height
    if None in (w, h, ow, oh) or (w, h) == (ow, oh) or not ow or not oh:
        return box
    sx, sy = w / ow, h / oh
    x0, y0, x1, y1 = box
    if mode == "border":  # scaled to fit, then padded to the output size
        s = min(sx, sy)
        dx, dy = (w - ow * s) / 2, (h - oh * s) / 2
        return x0 * s + dx, y0 * s + dy, x1 * s + dx, y1 * s + dy
    if mode == "center_crop":  # scaled to cover, then centre-cropped to the output size
        s = max(sx, sy)
        dx, dy = (ow * s - w) / 2, (oh * s - h) / 2
        return x0 * s - dx, y0 * s - dy, x1 * s - dx, y1 * s - dy
    # auto: a uniform scale (keep_ratio) maps exactly, up to rounding of the stored sizes
    if abs(sx - sy) <= 1.0 / min(w, h) + 1e-9 or abs(sx - sy) <= 0.005 * max(sx, sy):
        return x0 * sx, y0 * sy, x1 * sx, y1 * sy
    raise SkipSample(
        "box_mismatch",
        f"stored {w}x{h} from {ow}x{oh} is not a uniform scale; pass --resize-mode border or center_crop "
        "as given to img2dataset, or download with --resize_mode no",
    )


def _box_text(box: tuple[float, float, float, float]) -> str:
    return ",".join(f"{v:.2f}" for v in box)


@dataclass
class FaceCaptionSource:
    parquet: Sequence[Path]
    images: Sequence[Path]
    url_column: str = "url"
    box_column: str = "face_bbox"
    caption_column: str = "face_caption"
    box_format: str = "xyxy"
    resize_mode: str = "auto"
    workers: int = 1
    command: str = "facecaption15m"

    def __post_init__(self) -> None:
        self.parquet = [
            Path(p) for p in ([self.parquet] if isinstance(self.parquet, str | Path) else self.parquet)
        ]
        self.images = [
            Path(p) for p in ([self.images] if isinstance(self.images, str | Path) else self.images)
        ]
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"box_format={self.box_format!r}; accepted: {', '.join(BOX_FORMATS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}; accepted: {', '.join(RESIZE_MODES)}")
        for path in self.parquet:
            if not path.is_file():
                raise FileNotFoundError(f"FaceCaption-15M parquet {str(path)!r} does not exist")
            self._check_columns(path, table_columns(path))  # before any output exists
        self._rows: int | None = None
        self._truncated = 0
        self._tars = sorted(str(t) for folder in self.images for t in self._tars_in(folder))
        if not self._tars:
            raise FileNotFoundError(
                f"no img2dataset .tar shards in {', '.join(map(str, self.images))}; fetch the images with "
                "img2dataset --output_format webdataset first"
            )

    @staticmethod
    def _tars_in(folder: Path) -> list[Path]:
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
        return sorted(folder.glob("*.tar"))

    def describe(self) -> dict[str, Any]:
        return {
            "parquet": [str(p) for p in self.parquet],
            "images": [str(p) for p in self.images],
            "tars": len(self._tars),
            "url_column": self.url_column,
            "box_column": self.box_column,
            "caption_column": self.caption_column,
            "box_format": self.box_format,
            "resize_mode": self.resize_mode,
        }

    def total(self) -> int:
        """Parquet rows, plus one per damaged tar once the downloads are indexed."""
        if self._rows is None:
            self._rows = sum(parquet_rows(p) for p in self.parquet)
        return self._rows + self._truncated

    def _index(self, skips: SkipLog) -> dict[str, Download]:
        if self.workers > 1 and len(self._tars) > 1:  # workers that die with the run (see workers.py)
            with WorkerPool(index_tar, min(self.workers, len(self._tars))) as pool:
                found_in = dict(pool.imap_unordered(self._tars))
            results = [found_in[t] for t in self._tars]
        else:
            results = [index_tar(t) for t in self._tars]
        index: dict[str, Download] = {}
        details = {
            "truncated_tar": "the tar ends early; its complete members are used",
            "not_a_tar": "the file is not a tar archive (empty, or other content); nothing in it is used",
        }
        for tar, (found, problem) in zip(self._tars, results, strict=True):
            if problem is not None:
                self._truncated += 1
                skips.add(problem, tar, details[problem])
            for url, download in found.items():
                index.setdefault(url, download)
        return index

    def items(self, skips: SkipLog) -> Iterator[Item]:
        self._truncated = 0
        index = self._index(skips)
        checked: set[Path] = set()
        for path in self.parquet:
            for where, row, problem in read_rows(path):
                if row is None:
                    skips.add("bad_row", where, problem)
                    continue
                if path not in checked:
                    self._check_columns(path, row)
                    checked.add(path)
                try:
                    yield self._item(row, index)
                except SkipSample as skip:
                    skips.add(skip.reason, where, skip.detail)

    def _check_columns(self, path: Path, row: Sequence[str] | dict[str, Any]) -> None:
        for flag, name in (
            ("url", self.url_column),
            ("box", self.box_column),
            ("caption", self.caption_column),
        ):
            if name not in row:
                raise ValueError(
                    f"{path}: no {flag} column {name!r} (set it with --{flag}-column); "
                    f"the file has columns {', '.join(map(repr, row))}"
                )

    def _item(self, row: dict[str, Any], index: dict[str, Download]) -> Item:
        caption = clean_caption(row.get(self.caption_column))
        url = row.get(self.url_column)
        if not isinstance(url, str) or not url.strip():
            raise SkipSample("bad_row", f"no url in column {self.url_column!r} ({url!r})")
        box = parse_box(row.get(self.box_column), self.box_format)
        download = index.get(url)
        if download is None:
            raise SkipSample("not_downloaded", url[:200])
        mapped = map_box(box, download, self.resize_mode)
        key = hashlib.sha256(f"{url}|{_box_text(box)}".encode()).hexdigest()[:20]
        skip = {self.url_column, self.box_column, self.caption_column}
        metadata = {
            (f"extra_{k}" if k in RESERVED_KEYS else k): json_safe(v) for k, v in row.items() if k not in skip
        }
        metadata.update(url=url, face_box=list(box), box_format="xyxy")
        image = ImageRef(download.tar, download.offset, download.size, download.member)
        return Item(key, image, caption, metadata, mapped)
