"""CelebA and LFWA as labelled splits of 40 binary attributes, for evaluation.

CelebA is read by `flip.benchmarks.celeba` (the published `Anno/ Eval/ Img/` layout or the flat
one). LFWA ships as MATLAB files; FLIP accepts it converted to the same text layout as CelebA:

    ROOT/list_attr_lfwa.txt            (or Anno/): image count, header of 40 names, then
                                       `Aaron_Eckhart/Aaron_Eckhart_0001.jpg  1 -1 ...`
    ROOT/list_eval_partition_lfwa.txt  (or list_eval_partition.txt, or in Eval/):
                                       `<image> 0|1|2` (0 train, 1 val, 2 test)
    ROOT/lfw/<image>                   (images as the lists name them; or img/, or ROOT itself)
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from flip.benchmarks.base import ImageFiles, LabelledSplit, find_first, inside
from flip.benchmarks.celeba import (
    CELEBA_SPLITS,
    OUTSIDE_ROOT,
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


def _split(
    benchmark: str,
    split: str,
    names: list[str],
    rows: list[tuple[str, str, dict[str, bool]]],
    skipped: dict[str, int],
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


def read_lfwa(root: str | os.PathLike, split: str) -> LabelledSplit:
    """An LFWA split in the CelebA text layout described in the module doc."""
    if split not in CELEBA_SPLITS:
        raise ValueError(f"lfwa has no split {split!r}; accepted: {', '.join(CELEBA_SPLITS)}")
    root = Path(root)
    names, attributes = read_attribute_file(find_first(root, LFWA_ATTRIBUTE_FILES, "LFWA attribute list"))
    partition_file = find_first(root, LFWA_PARTITION_FILES, "LFWA split file")
    partition = read_partition_file(partition_file)
    image_dir = next((root / d for d in LFWA_IMAGE_DIRS if (root / d).is_dir()), root)
    missing = [name for name in attributes if name not in partition]
    if missing:
        raise ValueError(
            f"{partition_file}: no split for {len(missing)} image(s) of the attribute list, "
            f"e.g. {missing[0]!r}"
        )
    rows, outside = [], 0
    for name, values in attributes.items():
        if partition[name] != split:
            continue
        image = inside(image_dir, name)
        if image is None:
            outside += 1
        else:
            rows.append((name, str(image), values))
    if not rows:
        raise ValueError(f"LFWA under {str(root)!r} has no images in split {split!r} ({partition_file})")
    return _split("lfwa", split, names, rows, {OUTSIDE_ROOT: outside} if outside else {})
