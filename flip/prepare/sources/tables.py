"""Reading caption tables (CSV, TSV, JSONL, parquet) row by row, and judging caption values.

Rows come out as (where, dict) pairs, where `where` names the file and line (or row), so a
skipped row can be found again. A row that cannot be parsed comes out as (where, None,
problem) and is counted, not fatal. Text files are decoded with `surrogateescape`, so bytes
that are not UTF-8 survive decoding as lone surrogates and the caption that holds them is
skipped as non-UTF-8 instead of the whole file failing to load.

`table_columns` reads only the head of a table, so a command can refuse a missing file, an
empty table or a wrong column before it creates any output.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flip.prepare.hygiene import SkipSample

__all__ = [
    "TABLE_FORMATS",
    "clean_caption",
    "clean_captions",
    "json_safe",
    "pick_column",
    "read_rows",
    "table_columns",
]

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
        _refuse_duplicates(header, path)
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
                row = json.loads(text, object_pairs_hook=_unique_pairs)
            except _DuplicateName as exc:
                yield where, None, f"the object names {exc.args[0]!r} twice"
                continue
            except ValueError as exc:
                yield where, None, f"not JSON ({exc})"
                continue
            if not isinstance(row, dict):
                yield where, None, f"a JSON {type(row).__name__}, not an object"
                continue
            yield where, row, ""


class _DuplicateName(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose names are unique: json.loads would silently keep the last of two."""
    seen: dict[str, Any] = {}
    for name, value in pairs:
        if name in seen:
            raise _DuplicateName(name)
        seen[name] = value
    return seen


def _refuse_duplicates(columns: Sequence[str], path: Path) -> None:
    """Two columns of one name: any choice between them would be a silent guess."""
    repeated = sorted({name for name in columns if list(columns).count(name) > 1})
    if repeated:
        raise ValueError(
            f"captions file {str(path)!r}: column name(s) {', '.join(map(repr, repeated))} appear more "
            "than once; rename them so that each column has its own name"
        )


def table_columns(path: str | Path) -> list[str]:
    """The columns of a captions table (of its first parseable row, for JSONL), read from its head.

    Raises FileNotFoundError for a missing file and ValueError for an unknown format, a table
    without a data row, or repeated column names: what would otherwise surface mid-run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {str(path)!r} does not exist")
    fmt = _format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        columns = list(parquet.schema_arrow.names)
        _refuse_duplicates(columns, path)
        if parquet.metadata.num_rows == 0:
            raise ValueError(
                f"captions file {str(path)!r} holds no rows; expected one row per (image, caption)"
            )
        return columns
    first = next((row for _, row, _ in read_rows(path) if row is not None), None)
    if first is None:
        raise ValueError(
            f"captions file {str(path)!r} holds no usable rows; expected a header and one row per "
            "(image, caption)" + (" (one JSON object per line)" if fmt == "jsonl" else "")
        )
    return list(first)


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    _refuse_duplicates(pq.ParquetFile(path).schema_arrow.names, path)
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


_LINE_BREAKS = frozenset("\t\n\r\x0b\x0c")  # whitespace: normalised to single spaces below


def clean_caption(value: Any) -> str:
    """A usable caption string, or SkipSample saying why not.

    Only text is a caption: a number or a mapping in the caption column is a wrong column or a
    broken export, and its `str()` (`{'nested': 'dict'}`) would teach the model garbage, so it
    is skipped as `not_text_caption`. A caption holding control characters other than line
    breaks and tabs (NUL, ESC, ...) is skipped as `control_characters`, not cleaned: such
    bytes mean the row was cut from binary or corrupted data, and what surrounds them is
    rarely the caption that was meant.
    """
    if _is_missing(value):
        raise SkipSample("missing_caption", "the caption is null")
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SkipSample("non_utf8_caption", f"byte {exc.start}: {bytes(value)[:60]!r}") from None
    if not isinstance(value, str):
        raise SkipSample("not_text_caption", f"a {type(value).__name__}: {json_safe(value)!r}"[:120])
    text = value
    if any("\ud800" <= ch <= "\udfff" for ch in text):  # bytes that were not UTF-8 (surrogateescape)
        raise SkipSample("non_utf8_caption", repr(_to_utf8(text))[:80])
    control = next((ch for ch in text if ch not in _LINE_BREAKS and unicodedata.category(ch) == "Cc"), None)
    if control is not None:
        raise SkipSample(
            "control_characters", f"{control!r} at character {text.index(control)} of {text[:60]!r}"
        )
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
