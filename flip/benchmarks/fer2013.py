"""FER2013 in its published form: one `fer2013.csv` of 48x48 grayscale faces.

    ROOT/fer2013.csv   (or ROOT given as the CSV itself)
    emotion,pixels,Usage
    0,"70 80 82 ... (2304 values)",Training

emotion 0..6 = Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral; Usage Training (train),
PublicTest (val) and PrivateTest (test), as the literature uses them.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from flip.benchmarks.base import LabelledSplit, MalformedFileError, PixelArrays, check_split

FER2013_CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
FER2013_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FER2013_SPLITS = ("train", "val", "test")
SIDE = 48


def _csv_path(root: str | os.PathLike) -> Path:
    root = Path(root)
    path = root if root.is_file() else root / "fer2013.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"FER2013: {str(path)!r} does not exist; benchmark.root must hold fer2013.csv"
        )
    return path


def read_fer2013(root: str | os.PathLike, split: str) -> LabelledSplit:
    """The `split` ("train", "val" = PublicTest, "test" = PrivateTest) of fer2013.csv."""
    check_split(split, FER2013_SPLITS, "fer2013")
    path = _csv_path(root)
    labels, pixels, names = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["emotion", "pixels", "Usage"]:
            raise MalformedFileError(path, 1, f"header is {header!r}", "'emotion,pixels,Usage'")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) < 3:
                raise MalformedFileError(path, line, f"{len(row)} fields", "3 fields: emotion,pixels,Usage")
            emotion, values, usage = row[0].strip(), row[1], row[2].strip()
            if usage not in FER2013_USAGE:
                raise MalformedFileError(
                    path, line, f"Usage is {usage!r}", f"one of {', '.join(FER2013_USAGE)}"
                )
            if FER2013_USAGE[usage] != split:
                continue
            if not emotion.isdigit() or int(emotion) > 6:
                raise MalformedFileError(path, line, f"emotion is {emotion!r}", "an integer 0..6")
            try:
                image = np.asarray(values.split(), dtype=np.int64)
            except ValueError:
                raise MalformedFileError(
                    path,
                    line,
                    "pixels are not all integers",
                    f"{SIDE * SIDE} space-separated integers 0..255",
                ) from None
            if image.size != SIDE * SIDE:
                raise MalformedFileError(
                    path, line, f"{image.size} pixel values", f"{SIDE * SIDE} space-separated integers 0..255"
                )
            outside = np.flatnonzero((image < 0) | (image > 255))
            if outside.size:
                first = int(outside[0])
                raise MalformedFileError(
                    path,
                    line,
                    f"pixel {first} is {int(image[first])}, outside 0..255 ({outside.size} such value(s))",
                    "8-bit grayscale values 0..255",
                )
            labels.append(int(emotion))
            pixels.append(image.astype(np.uint8).reshape(SIDE, SIDE))
            names.append(f"fer2013.csv:{line}")
    return LabelledSplit(
        benchmark="fer2013",
        split=split,
        task="classification",
        label_names=list(FER2013_CLASSES),
        targets=np.asarray(labels, dtype=np.int64),
        images=PixelArrays(np.stack(pixels) if pixels else np.zeros((0, SIDE, SIDE), np.uint8), tuple(names)),
        keys=names,
    )
