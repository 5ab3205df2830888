"""Generic CSV label files: `image,label` (classification) or `image,attr1,attr2,...` (attributes).

    ROOT/train.csv  ROOT/val.csv  ROOT/test.csv       (any of them), or
    ROOT = one CSV with a `split` column (train/val/test), or one CSV without it (all "test").

`image` is a path relative to the CSV's folder (or `image_root`). An optional `caption`
column makes the split usable for retrieval. Attribute values are 1/0, 1/-1 or true/false
(empty = unlabelled); class labels are any strings, ordered as `classes` lists them or sorted
over all splits.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flip.benchmarks.base import ImageFiles, LabelledSplit, MalformedFileError, parse_binary

SPLITS = ("train", "val", "test")
RESERVED = ("image", "split", "caption")


def _files(root: Path) -> dict[str, Path]:
    """Split -> CSV file; a single file stands for every split its rows name."""
    if root.is_file():
        return {"*": root}
    if not root.is_dir():
        raise FileNotFoundError(f"csv benchmark: {str(root)!r} is neither a CSV file nor a folder")
    found = {s: root / f"{s}.csv" for s in SPLITS if (root / f"{s}.csv").is_file()}
    if not found:
        raise FileNotFoundError(f"csv benchmark: {str(root)!r} holds none of {[f'{s}.csv' for s in SPLITS]}")
    return found


def _rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        if "image" not in header:
            raise MalformedFileError(path, 1, f"header is {header}", "an 'image' column and label columns")
        labels = [h for h in header if h not in RESERVED]
        if not labels:
            raise MalformedFileError(
                path, 1, f"header is {header}", "'image,label' or 'image,attr1,attr2,...'"
            )
        rows = []
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise MalformedFileError(
                    path, reader.line_num, "wrong number of fields", f"{len(header)} fields"
                )
            rows.append((reader.line_num, row))
    return labels, rows


def _split_of(row: dict[str, str], single_file: bool, path: Path, line: int) -> str:
    if not single_file:
        return ""
    if "split" not in row:
        return "test"
    split = row["split"].strip()
    if split not in SPLITS:
        raise MalformedFileError(path, line, f"split is {split!r}", f"one of {', '.join(SPLITS)}")
    return split


def csv_splits(root: str | os.PathLike) -> list[str]:
    """The splits a CSV benchmark holds."""
    files = _files(Path(root))
    if "*" not in files:
        return list(files)
    path = files["*"]
    _, rows = _rows(path)
    return sorted({_split_of(r, True, path, n) for n, r in rows}, key=SPLITS.index)


def read_csv_labels(
    root: str | os.PathLike,
    split: str,
    image_root: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    name: str = "csv",
) -> LabelledSplit:
    """One split of a CSV-labelled dataset (see the module doc for the accepted layouts)."""
    files = _files(Path(root))
    single = "*" in files
    if not single and split not in files:
        raise ValueError(f"csv benchmark {str(root)!r} has no split {split!r}; it has {sorted(files)}")
    path = files["*"] if single else files[split]
    labels, rows = _rows(path)
    rows = [(n, r) for n, r in rows if not single or _split_of(r, True, path, n) == split]
    if single and not rows:
        raise ValueError(
            f"csv benchmark {str(path)!r} has no rows of split {split!r}; it has {csv_splits(root)}"
        )
    base = Path(image_root) if image_root is not None else path.parent
    task = "classification" if labels == ["label"] else "attributes"
    if task == "classification":
        names = list(classes) if classes is not None else _all_classes(files)
        index = {c: i for i, c in enumerate(names)}
        targets = []
        for line, row in rows:
            value = row["label"].strip()
            if value not in index:
                raise MalformedFileError(
                    path, line, f"label {value!r} is not a known class", f"one of {names}"
                )
            targets.append(index[value])
        target_array = np.asarray(targets, dtype=np.int64)
    else:
        names = labels
        target_array = np.asarray(
            [[parse_binary(row[c], path, line, c) for c in labels] for line, row in rows], dtype=np.int8
        ).reshape(len(rows), len(labels))
    images = [row["image"].strip() for _, row in rows]
    for (line, _), image in zip(rows, images, strict=True):
        if not image:
            raise MalformedFileError(path, line, "the image field is empty", "a path relative to the CSV")
    captions = [row["caption"] for _, row in rows] if rows and "caption" in rows[0][1] else None
    return LabelledSplit(
        benchmark=name,
        split=split,
        task=task,
        label_names=names,
        targets=target_array,
        images=ImageFiles(tuple(str(base / image) for image in images)),
        keys=images,
        captions=captions,
    )


def _all_classes(files: dict[str, Path]) -> list[str]:
    """Sorted class names over every CSV of the benchmark (numerically when all are integers)."""
    values = {row["label"].strip() for path in files.values() for _, row in _rows(path)[1]}
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)
