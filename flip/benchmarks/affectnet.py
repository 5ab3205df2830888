"""AffectNet (manually annotated part) in its published layout.

    ROOT/Manually_Annotated_file_lists/training.csv    (train)
    ROOT/Manually_Annotated_file_lists/validation.csv  (test: the official test set is not public)
    ROOT/Manually_Annotated_Images/<subDirectory_filePath>

(the CSVs may also sit in ROOT, and the images directly under ROOT). Columns:
subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks, expression,
valence, arousal. Expressions 0..7 (Neutral, Happy, Sad, Surprise, Fear, Disgust, Anger,
Contempt) are kept, 8..10 (None, Uncertain, No-Face) are not expressions and are dropped;
each face is cropped from its box.
"""

from __future__ import annotations

import csv
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

AFFECTNET_CLASSES = ["Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt"]
AFFECTNET_FILES = {"train": "training.csv", "test": "validation.csv"}
COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")
DROPPED = {8: "None", 9: "Uncertain", 10: "No-Face"}


def read_affectnet(root: str | os.PathLike, split: str, num_classes: int = 8) -> LabelledSplit:
    """The `split` of AffectNet; `num_classes=7` also drops Contempt (the common 7-class protocol)."""
    check_split(split, tuple(AFFECTNET_FILES), "affectnet")
    if num_classes not in (7, 8):
        raise ValueError(f"affectnet num_classes={num_classes}; accepted: 8 (with Contempt) or 7")
    root = Path(root)
    name = AFFECTNET_FILES[split]
    path = find_first(root, (f"Manually_Annotated_file_lists/{name}", name), f"AffectNet {name}")
    image_root = root / "Manually_Annotated_Images"
    if not image_root.is_dir():
        image_root = root
    paths, boxes, labels, keys, dropped, outside = [], [], [], [], 0, 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise MalformedFileError(
                path, 1, f"header lacks {missing}", "the columns " + ", ".join(COLUMNS) + ", ..."
            )
        for row in reader:
            line = reader.line_num
            try:
                expression = int(row["expression"])
                box = tuple(int(float(row[c])) for c in ("face_x", "face_y", "face_width", "face_height"))
            except (TypeError, ValueError):
                raise MalformedFileError(
                    path, line, f"expression/box fields {[row.get(c) for c in COLUMNS[1:]]}", "integers"
                ) from None
            if not 0 <= expression <= 10:
                raise MalformedFileError(path, line, f"expression is {expression}", "an integer 0..10")
            if expression >= num_classes:  # None / Uncertain / No-Face (and Contempt for 7 classes)
                dropped += 1
                continue
            if box[2] <= 0 or box[3] <= 0:
                raise MalformedFileError(
                    path, line, f"face box {box}", "a positive face_width and face_height"
                )
            rel = row["subDirectory_filePath"]
            image = inside(image_root, rel)
            if image is None:
                outside += 1
                continue
            paths.append(str(image))
            boxes.append(box)
            labels.append(expression)
            keys.append(rel)
    return LabelledSplit(
        benchmark="affectnet",
        split=split,
        task="classification",
        label_names=AFFECTNET_CLASSES[:num_classes],
        targets=np.asarray(labels, dtype=np.int64),
        images=ImageFiles(tuple(paths), tuple(boxes)),
        keys=keys,
        skipped_by_reason={
            reason: n for reason, n in (("not_in_protocol", dropped), (OUTSIDE_ROOT, outside)) if n
        },
    )
