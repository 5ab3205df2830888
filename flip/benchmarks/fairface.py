"""FairFace: age bucket, gender and race, in the layout its authors publish.

    ROOT/fairface_label_train.csv          file,age,gender,race,service_test
    ROOT/fairface_label_val.csv            train/9.jpg,10-19,Male,White,True
    ROOT/fairface-img-margin025-trainval/  train/1.jpg ... val/1.jpg ...  (padding 0.25; default)
    ROOT/fairface-img-margin125-trainval/  the same faces cut with padding 1.25 (padding=1.25)

`file` is relative to the image folder; a ROOT that holds `train/` and `val/` itself (the
image zip unpacked into it) is read as the image folder. FairFace has no test split: `val` is
the split its authors report on, so the linear probe chooses its l2 on a held-out part of train.
The age buckets are shared with UTKFace (`age_group_of`), so the two read side by side.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flip.benchmarks.base import (
    OUTSIDE_ROOT,
    ImageFiles,
    LabelledSplit,
    MalformedFileError,
    check_split,
    inside,
)

AGE_GROUPS = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"]
AGE_GROUP_STARTS = np.array([0, 3, 10, 20, 30, 40, 50, 60, 70], dtype=np.float64)
GENDERS = ["Male", "Female"]
FAIRFACE_RACES = [
    "East Asian",
    "Indian",
    "Black",
    "White",
    "Middle Eastern",
    "Latino_Hispanic",
    "Southeast Asian",
]
FAIRFACE_SPLITS = ("train", "val")
HEADER = ["file", "age", "gender", "race"]  # then service_test, which evaluation does not use
PADDINGS = {0.25: "025", 1.25: "125"}


def age_group_of(ages: np.ndarray | Sequence[float]) -> np.ndarray:
    """FairFace's bucket index of each age (a group holds [start, next start)); -1 where the age
    is NaN or negative. Integer ages and a model's expected (fractional) ages map the same way."""
    ages = np.asarray(ages, dtype=np.float64)
    groups = np.searchsorted(AGE_GROUP_STARTS, np.nan_to_num(ages, nan=-1.0), side="right") - 1
    return np.where(np.isfinite(ages) & (ages >= 0), groups, -1).astype(np.int64)


def image_folder(root: Path, padding: float) -> Path:
    """The image folder of `padding` under root, or root itself when it holds train/ and val/."""
    if padding not in PADDINGS:
        raise ValueError(f"fairface padding={padding!r}; accepted: {', '.join(map(str, PADDINGS))}")
    folder = root / f"fairface-img-margin{PADDINGS[padding]}-trainval"
    if folder.is_dir():
        return folder
    if (root / "train").is_dir() or (root / "val").is_dir():
        return root
    raise FileNotFoundError(
        f"FairFace images: neither {str(folder)!r} nor {str(root)!r}/train|val exists; "
        f"check benchmark.root and benchmark.reader.padding={padding}"
    )


def _index(value: str, accepted: Sequence[str], path: Path, line: int, column: str) -> int:
    if value not in accepted:
        raise MalformedFileError(
            path, line, f"{column} is {value!r}", f"one of {', '.join(repr(a) for a in accepted)}"
        )
    return accepted.index(value)


def parse_fairface_labels(path: str | os.PathLike) -> list[tuple[str, int, int, int, int]]:
    """(file, age group, gender, race, line number) per row of a fairface_label_*.csv."""
    path = Path(path)
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM is not part of the header
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:4]] != HEADER:
            raise MalformedFileError(path, 1, f"header is {header!r}", "'file,age,gender,race,service_test'")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise MalformedFileError(
                    path,
                    line,
                    f"{len(row)} fields in {','.join(row)!r}",
                    f"{len(header)}: {','.join(header)}",
                )
            name, age, gender, race = (v.strip() for v in row[:4])
            if not name:
                raise MalformedFileError(
                    path, line, "the file field is empty", "an image path like train/1.jpg"
                )
            rows.append(
                (
                    name,
                    _index(age, AGE_GROUPS, path, line, "age"),
                    _index(gender, GENDERS, path, line, "gender"),
                    _index(race, FAIRFACE_RACES, path, line, "race"),
                    line,
                )
            )
    return rows


def read_fairface(root: str | os.PathLike, split: str, padding: float = 0.25) -> LabelledSplit:
    """The `split` ("train" or "val") of FairFace under `root`, its images cut with `padding`."""
    check_split(split, FAIRFACE_SPLITS, "fairface")
    root = Path(root)
    labels = root / f"fairface_label_{split}.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"FairFace labels: {str(labels)!r} does not exist; check benchmark.root")
    folder = image_folder(root, float(padding))
    kept, outside = [], 0
    for name, age, gender, race, _ in parse_fairface_labels(labels):
        path = inside(folder, name)
        if path is None:
            outside += 1
        else:
            kept.append((name, str(path), age, gender, race))

    def column(i: int) -> np.ndarray:
        return np.asarray([r[i] for r in kept], dtype=np.int64)

    return LabelledSplit(
        benchmark="fairface",
        split=split,
        task="multitask",
        label_names=[],
        targets=np.zeros((len(kept), 0), dtype=np.int64),
        images=ImageFiles(tuple(r[1] for r in kept)),
        keys=[r[0] for r in kept],
        questions={
            "gender": (list(GENDERS), column(3)),
            "race": (list(FAIRFACE_RACES), column(4)),
            "age_group": (list(AGE_GROUPS), column(2)),
        },
        info={"padding": float(padding), "image_folder": str(folder), "labels": str(labels)},
        skipped_by_reason={OUTSIDE_ROOT: outside} if outside else {},
    )
