"""Face parsing benchmarks in their published layouts: LaPa and CelebAMask-HQ.

    LaPa/{train,val,test}/images/<name>.jpg     faces
    LaPa/{train,val,test}/labels/<name>.png     grayscale, each pixel its class id (0..10)

    CelebAMask-HQ/CelebA-HQ-img/<N>.jpg                          N = 0..29999, 1024 px
    CelebAMask-HQ/CelebAMask-HQ-mask-anno/<N // 2000>/<NNNNN>_<class>.png
                                                 512 px, one binary PNG per class present
    CelebAMask-HQ/CelebA-HQ-to-CelebA-mapping.txt  `idx orig_idx orig_file`, then `0 119613 119614.jpg`
    CelebAMask-HQ/list_eval_partition.txt          CelebA's partition (`000001.jpg 0`), supplied
                                                   by the user, as FaRL reads it (or Eval/...)

CelebAMask-HQ has no split of its own: a face is in CelebA's train, val or test split through
the mapping file, as FaRL splits it. Its class masks overlap; they are painted in FaRL's order
(`paint_order="farl"`, the order behind FaRL's figures: neck, skin, cloth, ears, brows, eyes,
nose, mouth, lips, hair, then glasses, hat, earrings, necklace on top) or in the dataset's own
(`"official"`, its g_mask.py's: skin ... cloth, later on top). Either way a class keeps its
official id and name; results name classes, never ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flip.benchmarks.base import (
    ImageFiles,
    LabelledSplit,
    MalformedFileError,
    check_split,
    find_first,
)
from flip.benchmarks.dense import PARSING, DenseLabels, LayeredMasks, MaskFiles
from flip.data.shards import is_image_file

LAPA_CLASSES = (
    "background",
    "skin",
    "left_eyebrow",
    "right_eyebrow",
    "left_eye",
    "right_eye",
    "nose",
    "upper_lip",
    "inner_mouth",
    "lower_lip",
    "hair",
)
LAPA_SPLITS = ("train", "val", "test")
# official ids: the class at index i is painted with value i
CELEBAMASK_CLASSES = (
    "background",
    "skin",
    "nose",
    "eye_g",
    "l_eye",
    "r_eye",
    "l_brow",
    "r_brow",
    "l_ear",
    "r_ear",
    "mouth",
    "u_lip",
    "l_lip",
    "hair",
    "hat",
    "ear_r",
    "neck_l",
    "neck",
    "cloth",
)
PAINT_ORDERS = {
    "official": CELEBAMASK_CLASSES[1:],
    "farl": (
        "neck",
        "skin",
        "cloth",
        "l_ear",
        "r_ear",
        "l_brow",
        "r_brow",
        "l_eye",
        "r_eye",
        "nose",
        "mouth",
        "l_lip",
        "u_lip",
        "hair",
        "eye_g",
        "hat",
        "ear_r",
        "neck_l",
    ),
}
CELEBA_SPLITS = {"train": "0", "val": "1", "test": "2"}
MASK_SIZE = (512, 512)


def _dense_split(benchmark: str, split: str, dense: DenseLabels, images: list[str], keys: list[str], **kw):
    return LabelledSplit(
        benchmark=benchmark,
        split=split,
        task=dense.kind,
        label_names=list(dense.names),
        targets=np.zeros((len(keys), 0), dtype=np.int8),
        images=ImageFiles(tuple(images)),
        keys=keys,
        dense=dense,
        **kw,
    )


def read_lapa(root: str | os.PathLike, split: str) -> LabelledSplit:
    """The `split` ("train", "val" or "test") of LaPa under `root` (or `root/LaPa`); an image
    without its label PNG is left out and counted (`missing_label`)."""
    check_split(split, LAPA_SPLITS, "lapa")
    folder = find_first(Path(root), (split, f"LaPa/{split}"), f"LaPa {split} folder")
    images_dir, labels_dir = folder / "images", folder / "labels"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"LaPa: no {images_dir}; expected {split}/images/ and {split}/labels/")
    images, labels, keys, missing = [], [], [], 0
    for name in sorted(os.listdir(images_dir)):
        if not is_image_file(name):
            continue
        label = labels_dir / f"{os.path.splitext(name)[0]}.png"
        if not label.is_file():
            missing += 1
            continue
        images.append(str(images_dir / name))
        labels.append(str(label))
        keys.append(os.path.splitext(name)[0])
    if not keys:
        raise FileNotFoundError(f"LaPa: no image with a label in {images_dir} and {labels_dir}")
    dense = DenseLabels(PARSING, LAPA_CLASSES, masks=MaskFiles(tuple(labels)))
    skipped = {"missing_label": missing} if missing else {}
    return _dense_split("lapa", split, dense, images, keys, skipped_by_reason=skipped)


def _celeba_split_of_hq(root: Path, partition: str | os.PathLike | None) -> dict[int, str]:
    """CelebA-HQ index -> CelebA partition ("0", "1", "2") through the mapping file."""
    mapping = find_first(root, ("CelebA-HQ-to-CelebA-mapping.txt",), "CelebAMask-HQ mapping file")
    if partition is None:
        partition = find_first(
            root,
            ("list_eval_partition.txt", "Eval/list_eval_partition.txt"),
            "CelebA's list_eval_partition.txt (put it in benchmark.root or set benchmark.reader.partition)",
        )
    groups = {}
    with open(partition, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise MalformedFileError(partition, number, f"read {line.strip()!r}", "'000001.jpg 0'")
            groups[fields[0]] = fields[1]
    hq_split = {}
    with open(mapping, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or fields[0] == "idx":
                continue
            if len(fields) != 3 or not fields[0].isdigit():
                raise MalformedFileError(
                    mapping, number, f"read {line.strip()!r}", "'<hq idx> <orig idx> <file>'"
                )
            if fields[2] not in groups:
                raise MalformedFileError(
                    mapping, number, f"{fields[2]} is not in {partition}", "CelebA's full partition file"
                )
            hq_split[int(fields[0])] = groups[fields[2]]
    return hq_split


def read_celebamask_hq(
    root: str | os.PathLike,
    split: str,
    paint_order: str = "farl",
    partition: str | os.PathLike | None = None,
) -> LabelledSplit:
    """The `split` ("train", "val", "test": CelebA's, through the mapping file) of
    CelebAMask-HQ under `root`; `partition` is CelebA's list_eval_partition.txt when it is not
    in `root`. A face whose image is missing is left out and counted (`missing_image`)."""
    check_split(split, tuple(CELEBA_SPLITS), "celebamask_hq")
    if paint_order not in PAINT_ORDERS:
        raise ValueError(f"celebamask_hq paint_order={paint_order!r}; accepted: {sorted(PAINT_ORDERS)}")
    root = Path(root)
    images_dir = find_first(root, ("CelebA-HQ-img",), "CelebA-HQ images")
    anno = find_first(root, ("CelebAMask-HQ-mask-anno",), "CelebAMask-HQ masks")
    present = {folder.name: set(os.listdir(folder)) for folder in anno.iterdir() if folder.is_dir()}
    wanted = CELEBA_SPLITS[split]
    order = [(CELEBAMASK_CLASSES.index(c), c) for c in PAINT_ORDERS[paint_order]]
    images, layers, keys, missing = [], [], [], 0
    for hq, group in sorted(_celeba_split_of_hq(root, partition).items()):
        if group != wanted:
            continue
        image = images_dir / f"{hq}.jpg"
        if not image.is_file():
            missing += 1
            continue
        folder = str(hq // 2000)
        files = present.get(folder, set())
        names = [(class_id, f"{hq:05d}_{name}.png") for class_id, name in order]
        layers.append(tuple((i, str(anno / folder / f)) for i, f in names if f in files))
        images.append(str(image))
        keys.append(str(hq))
    if not keys:
        raise FileNotFoundError(f"CelebAMask-HQ: no {split} image under {images_dir}")
    masks = LayeredMasks(tuple(layers), MASK_SIZE, tuple(keys))
    dense = DenseLabels(PARSING, CELEBAMASK_CLASSES, masks=masks)
    skipped = {"missing_image": missing} if missing else {}
    split_info = {"paint_order": paint_order, "split_from": "CelebA's list_eval_partition.txt"}
    return _dense_split(
        "celebamask_hq", split, dense, images, keys, skipped_by_reason=skipped, info=split_info
    )
