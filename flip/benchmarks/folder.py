"""Class-per-folder image datasets (torchvision's ImageFolder layout), with optional split folders.

    ROOT/train/<class>/*.jpg   ROOT/val/<class>/*.jpg   ROOT/test/<class>/*.jpg
or, with no split folders, ROOT/<class>/*.jpg as a single "test" split. Classes are the
sorted folder names over all splits, so a class index means the same in every split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flip.benchmarks.base import ImageFiles, LabelledSplit
from flip.data.shards import IMAGE_SUFFIXES, is_image_file

SPLIT_DIRS = ("train", "val", "test")


def folder_splits(root: str | os.PathLike) -> dict[str, Path]:
    """Split name -> folder: the train/val/test subfolders, or the root itself as "test"."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder benchmark: root {str(root)!r} is not a folder")
    found = {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()}
    return found or {"test": root}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_file(p.name) and p.is_file())


def read_folder(root: str | os.PathLike, split: str) -> LabelledSplit:
    """One split of a class-per-folder dataset; the class is the image's folder under the split."""
    splits = folder_splits(root)
    if split not in splits:
        raise ValueError(
            f"folder benchmark {str(root)!r} has no split {split!r}; it has {sorted(splits)} "
            f"(split folders are named {', '.join(SPLIT_DIRS)})"
        )
    classes = sorted({d.name for folder in splits.values() for d in folder.iterdir() if d.is_dir()})
    if not classes:
        raise FileNotFoundError(f"folder benchmark: {str(splits[split])!r} holds no class folders")
    paths, labels = [], []
    for index, name in enumerate(classes):
        folder = splits[split] / name
        found = _images(folder) if folder.is_dir() else []
        paths += [str(p) for p in found]
        labels += [index] * len(found)
    if not paths:
        raise FileNotFoundError(
            f"folder benchmark: no images ({', '.join(IMAGE_SUFFIXES)}) under {str(splits[split])!r}"
        )
    return LabelledSplit(
        benchmark="folder",
        split=split,
        task="classification",
        label_names=classes,
        targets=np.asarray(labels, dtype=np.int64),
        images=ImageFiles(tuple(paths)),
        keys=[os.path.relpath(p, splits[split]) for p in paths],
    )
