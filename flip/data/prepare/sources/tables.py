"""Reading caption tables (CSV, TSV, JSONL, parquet) row by row, and judging caption values.

Rows come out as (where, dict) pairs, where `where` names the file and line (or row), so a
skipped row can be found again. A row that cannot be parsed comes out as (where, None,
problem) and is counted, not fatal. Text files are decoded with `surrogateescape`, so bytes
that are not UTF-8 survive decoding as lone surrogates and the caption that holds them is
skipped as non-UTF-8 instead of the whole file failing to load.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flip.data.prepare.hygiene import SkipSample

__all__ = ["TABLE_FORMATS", "clean_caption", "clean_captions", "json_safe", "pick_column", "read_rows"]

TABLE_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}

Row = tuple[str, dict[str, Any] | None, str]  # (where, row or None, problem when None)


def _format(path: Path) -> str:
    fmt = TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"captions file {str(path)!r}: unknown format {path.suffix!r}; "
            f"accepted: {', '.join(TABLE_FORMATS)}"
        )
    return fmt


def read_rows(path: str | Path) -> Iterator[Row]:
    """Every row of a captions table as a dict; unparseable rows as (where, None, problem)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {str(path)!r} does not exist")
    fmt = _format(path)
    if fmt in ("csv", "tsv"):
        yield from _delimited(path, "," if fmt == "csv" else "\t")
    elif fmt == "jsonl":
        yield from _jsonl(path)
    else:
        yield from _parquet(path)


def _delimited(path: Path, delimiter: str) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip() for name in header]
        for fields in reader:
            where = f"{path.name}:{reader.line_num}"
            if not any(field.strip() for field in fields):
                continue  # blank line
            if len(fields) > len(header):
                yield where, None, f"{len(fields)} fields for a header of {len(header)}"
                continue
            # a short row leaves its last columns missing (None), unlike an empty field ("")
            yield where, dict(zip(header, [*fields, *[None] * (len(header) - len(fields))], strict=True)), ""


def _jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path.name}:{number}"
            text = raw.decode("utf-8", errors="surrogateescape").strip()
            if not text:
                continue
            try:
                row = json.loads(text)
            except ValueError as exc:
                yield where, None, f"not JSON ({exc})"
                continue
            if not isinstance(row, dict):
                yield where, None, f"a JSON {type(row).__name__}, not an object"
                continue
            yield where, row, ""


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=16_384):
        for row in batch.to_pylist():
            yield f"{path.name}:row {number}", row, ""
            number += 1


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def pick_column(
    columns: Sequence[str], wanted: str | None, defaults: Sequence[str], what: str, file: Path
) -> str:
    """The column to use: `wanted` if given (it must exist), else the first default present."""
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(
                f"{file}: no {what} column {wanted!r}; the file has columns {', '.join(map(repr, columns))}"
            )
        return wanted
    found = next((name for name in defaults if name in columns), None)
    if found is None:
        raise ValueError(
            f"{file}: none of the default {what} columns ({', '.join(defaults)}) is present; name it with "
            f"--{what}-column (the file has columns {', '.join(map(repr, columns))})"
        )
    return found


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def clean_caption(value: Any) -> str:
    """A usable caption string, or SkipSample: missing_caption, empty_caption or non_utf8_caption."""
    if _is_missing(value):
        raise SkipSample("missing_caption", "the caption is null")
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SkipSample("non_utf8_caption", f"byte {exc.start}: {bytes(value)[:60]!r}") from None
    text = str(value)
    if any("\ud800" <= ch <= "\udfff" for ch in text):  # bytes that were not UTF-8 (surrogateescape)
        raise SkipSample("non_utf8_caption", repr(_to_utf8(text))[:80])
    text = " ".join(text.split())  # newlines and runs of spaces would only confuse tokenizers
    if not text:
        raise SkipSample("empty_caption", f"{value!r}"[:60])
    return text


def clean_captions(value: Any) -> list[tuple[str | None, SkipSample | None]]:
    """One or many captions in a cell (a list holds many): each as (text, None) or (None, skip)."""
    values = list(value) if isinstance(value, list | tuple | np.ndarray) else [value]
    if not values:
        return [(None, SkipSample("missing_caption", "an empty list of captions"))]
    out: list[tuple[str | None, SkipSample | None]] = []
    for item in values:
        try:
            out.append((clean_caption(item), None))
        except SkipSample as skip:
            out.append((None, skip))
    return out


def _to_utf8(text: str) -> str:
    """`text` with undecodable bytes (lone surrogates) replaced by U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")
    except UnicodeEncodeError:  # surrogates that did not come from surrogateescape
        return text.encode("utf-8", "replace").decode("utf-8")


def json_safe(value: Any) -> Any:
    """A metadata value as JSON can hold it: numpy scalars and arrays unwrapped, NaN to null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return _to_utf8(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)
