"""CelebA and LFWA as labelled splits of 40 binary attributes, for evaluation.

CelebA is read by `flip.benchmarks.celeba` (the published `Anno/ Eval/ Img/` layout or the flat
one). LFWA ships as MATLAB files; FLIP accepts it converted to either of two text layouts, told
apart by the files present (the one read is recorded in the split's `info`):

CelebA's text layout ("celeba_text"):

    ROOT/list_attr_lfwa.txt            (or Anno/): image count, header of 40 names, then
                                       `Aaron_Eckhart/Aaron_Eckhart_0001.jpg  1 -1 ...`
    ROOT/list_eval_partition_lfwa.txt  (or list_eval_partition.txt, or in Eval/):
                                       `<image> 0|1|2` (0 train, 1 val, 2 test)

the CSV lists FLIP's released attribute probe reads ("flip_csv": its data/lfwa_dataset.py):

    ROOT/list_attr_lfwa.csv            train: a header row (an image column, then the 40
                                       attribute names), then `<image>,1,0,...` (1 present, 0
                                       absent; 1/-1 read too)
    ROOT/list_attr_lfwa_test.csv       test, the same columns

and in both, ROOT/lfw/<image> (images as the lists name them; or img/, images/,
lfw-deepfunneled/, or ROOT itself). FLIP's LFWA script trains its probe on the test list
(`create_dataset` returns the test set twice); here `train` is always the train list.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np

from flip.benchmarks.base import ImageFiles, LabelledSplit, MalformedFileError, find_first, inside
from flip.benchmarks.celeba import (
    CELEBA_SPLITS,
    OUTSIDE_ROOT,
    check_attribute_names,
    read_attribute_file,
    read_celeba,
    read_partition_file,
)

LFWA_ATTRIBUTE_FILES = ("list_attr_lfwa.txt", "Anno/list_attr_lfwa.txt")
LFWA_PARTITION_FILES = (
    "list_eval_partition_lfwa.txt",
    "Eval/list_eval_partition_lfwa.txt",
    "list_eval_partition.txt",
    "Eval/list_eval_partition.txt",
)
LFWA_IMAGE_DIRS = ("lfw", "img", "images", "lfw-deepfunneled")
LFWA_CSV_FILES = {"train": "list_attr_lfwa.csv", "test": "list_attr_lfwa_test.csv"}  # FLIP's names
LFWA_LAYOUTS = ("auto", "celeba_text", "flip_csv")
_CSV_VALUES = {"1": True, "1.0": True, "0": False, "0.0": False, "-1": False, "-1.0": False}


def _split(
    benchmark: str,
    split: str,
    names: list[str],
    rows: list[tuple[str, str, dict[str, bool]]],
    skipped: dict[str, int],
    info: dict | None = None,
) -> LabelledSplit:
    """rows: (key, image path, {attribute: bool})."""
    targets = np.asarray([[values[n] for n in names] for _, _, values in rows], dtype=np.int8)
    return LabelledSplit(
        benchmark=benchmark,
        split=split,
        task="attributes",
        label_names=names,
        targets=targets.reshape(len(rows), len(names)),
        images=ImageFiles(tuple(path for _, path, _ in rows)),
        keys=[key for key, _, _ in rows],
        skipped_by_reason=skipped,
        info=info or {},
    )


def read_celeba_split(root: str | os.PathLike, split: str) -> LabelledSplit:
    """A CelebA split ("train", "val", "test") with its 40 attributes in the file's column order."""
    skipped: Counter[str] = Counter()
    records = read_celeba(root, splits=split, skipped=skipped)
    if not records:
        raise ValueError(f"CelebA under {str(root)!r} has no images in split {split!r}")
    names = list(records[0].attributes)
    rows = [(r.image.name, str(r.image), r.attributes) for r in records]
    return _split("celeba", split, names, rows, dict(skipped))


def read_lfwa(root: str | os.PathLike, split: str, layout: str = "auto") -> LabelledSplit:
    """An LFWA split in either layout of the module doc; `layout="auto"` tells them apart by the
    files present (FLIP's CSV lists when `list_attr_lfwa.csv` or `list_attr_lfwa_test.csv` is in
    ROOT, else CelebA's text layout)."""
    if layout not in LFWA_LAYOUTS:
        raise ValueError(f"lfwa layout {layout!r} is not one of {', '.join(LFWA_LAYOUTS)}")
    if split not in CELEBA_SPLITS:
        raise ValueError(f"lfwa has no split {split!r}; accepted: {', '.join(CELEBA_SPLITS)}")
    root = Path(root)
    if layout == "auto":
        csv_present = any((root / name).is_file() for name in LFWA_CSV_FILES.values())
        layout = "flip_csv" if csv_present else "celeba_text"
    image_dir = next((root / d for d in LFWA_IMAGE_DIRS if (root / d).is_dir()), root)
    if layout == "flip_csv":
        if split not in LFWA_CSV_FILES:
            raise ValueError(
                f"lfwa in FLIP's CSV layout has no split {split!r}, only {', '.join(LFWA_CSV_FILES)} "
                f"({', '.join(LFWA_CSV_FILES.values())}); set benchmark.val_split=null"
            )
        list_file = root / LFWA_CSV_FILES[split]
        if not list_file.is_file():
            raise FileNotFoundError(
                f"LFWA {split} list {str(list_file)!r} does not exist (FLIP's CSV layout)"
            )
        names, attributes = read_lfwa_csv(list_file)
        info = {"layout": "flip_csv", "list": list_file.name}
        wanted = list(attributes)
    else:
        names, attributes = read_attribute_file(find_first(root, LFWA_ATTRIBUTE_FILES, "LFWA attribute list"))
        partition_file = find_first(root, LFWA_PARTITION_FILES, "LFWA split file")
        partition = read_partition_file(partition_file)
        missing = [name for name in attributes if name not in partition]
        if missing:
            raise ValueError(
                f"{partition_file}: no split for {len(missing)} image(s) of the attribute list, "
                f"e.g. {missing[0]!r}"
            )
        list_file = partition_file
        info = {"layout": "celeba_text", "list": str(partition_file.relative_to(root))}
        wanted = [name for name in attributes if partition[name] == split]
    rows, outside = [], 0
    for name in wanted:
        image = inside(image_dir, name)
        if image is None:
            outside += 1
        else:
            rows.append((name, str(image), attributes[name]))
    if not rows:
        raise ValueError(f"LFWA under {str(root)!r} has no images in split {split!r} ({list_file})")
    return _split("lfwa", split, names, rows, {OUTSIDE_ROOT: outside} if outside else {}, info)


def read_lfwa_csv(path: str | os.PathLike) -> tuple[list[str], dict[str, dict[str, bool]]]:
    """FLIP's LFWA list: a header row (image column, CelebA's 40 attribute names), then one image
    per row with 40 values, 1 present and 0 (or -1) absent."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = list(csv.reader(f))
    except UnicodeDecodeError as exc:
        raise MalformedFileError(path, None, f"not UTF-8 text ({exc.reason})", "a CSV file") from exc
    numbered = [(number, row) for number, row in enumerate(lines, start=1) if any(c.strip() for c in row)]
    if not numbered:
        raise MalformedFileError(path, None, "the file is empty", "a header row, then one image per row")
    header_line, header = numbered[0]
    names = [c.strip() for c in header[1:]]
    check_attribute_names(names, path, header_line)
    records: dict[str, dict[str, bool]] = {}
    for number, row in numbered[1:]:
        if len(row) != len(header):
            raise MalformedFileError(
                path, number, f"{len(row)} columns", f"an image name and {len(names)} values, as the header"
            )
        image, values = row[0].strip(), [v.strip() for v in row[1:]]
        bad = next((i for i, v in enumerate(values) if v not in _CSV_VALUES), None)
        if bad is not None:
            raise MalformedFileError(
                path, number, f"attribute {names[bad]} of {image} is {values[bad]!r}", "1 or 0 (or -1)"
            )
        if not image or image in records:
            raise MalformedFileError(
                path, number, f"image name {image!r} is empty or repeated", "each image once"
            )
        records[image] = {name: _CSV_VALUES[v] for name, v in zip(names, values, strict=True)}
    if not records:
        raise MalformedFileError(path, None, "the file lists no images", "one image per row after the header")
    return names, records
