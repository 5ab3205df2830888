"""RAF-DB basic expressions, in the layout its authors publish.

    ROOT/EmoLabel/list_patition_label.txt   `train_00001.jpg 5` / `test_0001.jpg 1` (sic: "patition")
    ROOT/Image/aligned/train_00001_aligned.jpg   (100x100 aligned faces; default)
    ROOT/Image/original/train_00001.jpg          (images="original")

Labels 1..7 are Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral; the split is the
file-name prefix.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flip.benchmarks.base import (
    OUTSIDE_ROOT,
    ImageFiles,
    LabelledSplit,
    MalformedFileError,
    check_split,
    find_first,
    inside,
)

RAFDB_CLASSES = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]
RAFDB_SPLITS = ("train", "test")
LABEL_FILES = (
    "EmoLabel/list_patition_label.txt",
    "EmoLabel/list_partition_label.txt",
    "list_patition_label.txt",
)


def parse_rafdb_labels(path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """(split, image name, class index 0..6) per line of the partition/label file."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].isdigit() or not 1 <= int(fields[1]) <= 7:
                raise MalformedFileError(
                    path, number, f"read {line.strip()!r}", "'<train|test>_NNNN.jpg <label 1..7>'"
                )
            name, label = fields[0], int(fields[1])
            split = name.split("_", 1)[0]
            if split not in RAFDB_SPLITS:
                raise MalformedFileError(
                    path, number, f"image name {name!r} has no train_/test_ prefix", "'train_00001.jpg 5'"
                )
            records.append((split, name, label - 1))
    if not records:
        raise MalformedFileError(
            path, None, "the file holds no labels", "one '<image> <label 1..7>' per line"
        )
    return records


def _image_path(images_dir: Path, name: str, aligned: bool) -> Path | None:
    """The image file of a label line, or None when its name leads outside the image folder."""
    if aligned:
        stem, ext = os.path.splitext(name)
        name = f"{stem}_aligned{ext}"
    return inside(images_dir, name)


def read_rafdb(root: str | os.PathLike, split: str, images: str = "aligned") -> LabelledSplit:
    """The `split` ("train" or "test") of RAF-DB basic under `root`."""
    check_split(split, RAFDB_SPLITS, "rafdb")
    if images not in ("aligned", "original"):
        raise ValueError(f"rafdb images={images!r}; accepted: 'aligned' or 'original'")
    root = Path(root)
    label_file = find_first(root, LABEL_FILES, "RAF-DB label file")
    images_dir = find_first(root, (f"Image/{images}", images), f"RAF-DB {images} images")
    rows, outside = [], 0
    for s, name, label in parse_rafdb_labels(label_file):
        image = _image_path(images_dir, name, images == "aligned") if s == split else None
        if s == split and image is None:
            outside += 1
        elif image is not None:
            rows.append((name, str(image), label))
    return LabelledSplit(
        benchmark="rafdb",
        split=split,
        task="classification",
        label_names=list(RAFDB_CLASSES),
        targets=np.asarray([label for _, _, label in rows], dtype=np.int64),
        images=ImageFiles(tuple(image for _, image, _ in rows)),
        keys=[name for name, _, _ in rows],
        skipped_by_reason={OUTSIDE_ROOT: outside} if outside else {},
    )
