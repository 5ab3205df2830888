"""Facial landmark benchmarks in their published layouts: WFLW, 300W and AFLW-19.

    WFLW/WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_{train,test}.txt
        one face per line: 196 numbers (98 x y), the box `xmin ymin xmax ymax`, 6 flags (pose
        expression illumination make-up occlusion blur), the image path under WFLW_images/
        (the list may also sit in ROOT or ROOT/list_98pt_rect_attr_train_test/)
    WFLW/WFLW_images/<event>/<name>.jpg

    300W/{afw,helen/trainset,lfpw/trainset}/*.pts + image     train (3,148 faces)
    300W/{helen/testset,lfpw/testset}/*.pts + image           common (554)
    300W/ibug/*.pts + image                                   challenging (135); test = both (689)
    300W/{01_Indoor,02_Outdoor}/*.pts + image                 private (the 300-W challenge's 600)
        iBUG .pts: `version: 1`, `n_points:  68`, `{`, one `x y` per line, `}`; the image is the
        file of the same name ending .jpg or .png

    AFLW/AFLWinfo_release.mat        read with scipy.io.loadmat (plain arrays, no code): `data`
                                     [N, 38] (19 x, then 19 y), `bbox` [N, 4] (left right top
                                     bottom), `nameList` (image paths), `mask_new` [N, 19]
                                     (1 = visible), `ra` (a 1-based permutation: the first
                                     20,000 faces train, the rest test)
    AFLW/data/flickr/<nameList path> the images (or flickr/ or ROOT itself)

NME normalisers, each dataset's own: 300W the outer eye corners (points 36 and 45, 0-based),
WFLW points 60 and 72, AFLW-19 the box size sqrt(width * height) (or its diagonal,
`normaliser="diagonal"`). 300W ships no box: the crop is the box around the face's points,
as the common 300W protocols (HRNet's center and scale) derive it. Coordinates are kept as
the files give them; NME does not depend on a shift of all points.
"""

from __future__ import annotations

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
    find_first,
    inside,
)
from flip.benchmarks.dense import LANDMARKS, DenseLabels, interocular, points_box

WFLW_FLAGS = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
WFLW_SPLITS = ("train", "test", *(f"test_{flag}" for flag in WFLW_FLAGS))
W300_FOLDERS = {
    "train": ("afw", "helen/trainset", "lfpw/trainset"),
    "common": ("helen/testset", "lfpw/testset"),
    "challenging": ("ibug",),
    "test": ("helen/testset", "lfpw/testset", "ibug"),
    "private": ("01_Indoor", "02_Outdoor"),
}
AFLW19_SPLITS = ("train", "test", "frontal")
AFLW19_TRAIN = 20_000
BOX_SCALE = 1.25  # the crop's side over the face box's longer side (HRNet's 300W/WFLW crops use 1.25)


def _names(count: int) -> tuple[str, ...]:
    return tuple(f"p{i}" for i in range(count))


def _landmark_split(
    benchmark: str,
    split: str,
    images: Sequence[str],
    keys: Sequence[str],
    dense: DenseLabels,
    skipped: dict[str, int],
    info: dict | None = None,
) -> LabelledSplit:
    if not keys:
        raise FileNotFoundError(f"{benchmark}: no face of split {split!r} has its image on disk")
    return LabelledSplit(
        benchmark=benchmark,
        split=split,
        task=LANDMARKS,
        label_names=list(dense.names),
        targets=np.zeros((len(keys), 0), dtype=np.int8),
        images=ImageFiles(tuple(images)),
        keys=list(keys),
        dense=dense,
        skipped_by_reason={k: v for k, v in skipped.items() if v},
        info=info or {},
    )


# -- WFLW --------------------------------------------------------------------------------------


def read_wflw(root: str | os.PathLike, split: str, box_scale: float = BOX_SCALE) -> LabelledSplit:
    """The `split` of WFLW: train, test, or a test subset by its flag (`test_pose`,
    `test_expression`, `test_illumination`, `test_makeup`, `test_occlusion`, `test_blur`)."""
    check_split(split, WFLW_SPLITS, "wflw")
    root = Path(root)
    part = "train" if split == "train" else "test"
    name = f"list_98pt_rect_attr_{part}.txt"
    listing = find_first(
        root,
        (
            f"WFLW_annotations/list_98pt_rect_attr_train_test/{name}",
            f"list_98pt_rect_attr_train_test/{name}",
            name,
        ),
        f"WFLW {part} annotation",
    )
    images_dir = find_first(root, ("WFLW_images", "images"), "WFLW images")
    flag = WFLW_FLAGS.index(split[5:]) if split.startswith("test_") else None
    points, boxes, images, keys, outside, missing = [], [], [], [], 0, 0
    with open(listing, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 196 + 4 + 6 + 1:
                raise MalformedFileError(
                    listing, number, f"{len(fields)} fields", "196 coordinates, 4 box values, 6 flags, a path"
                )
            try:
                values = [float(v) for v in fields[:200]]
                flags = [int(v) for v in fields[200:206]]
            except ValueError as exc:
                raise MalformedFileError(listing, number, str(exc), "numbers before the image path") from exc
            if flag is not None and flags[flag] != 1:
                continue
            path = inside(images_dir, fields[206])
            if path is None:
                outside += 1
                continue
            if not path.is_file():
                missing += 1
                continue
            points.append(np.reshape(values[:196], (98, 2)))
            boxes.append(values[196:200])
            images.append(str(path))
            keys.append(f"{fields[206]}#{number}")  # one image may hold several faces
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 98, 2)
    dense = DenseLabels(
        LANDMARKS,
        _names(98),
        points=xy,
        norms=interocular(xy, 60, 72),
        normaliser="inter-ocular (points 60 and 72)",
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        box_scale=box_scale,
    )
    skipped = {OUTSIDE_ROOT: outside, "missing_image": missing}
    return _landmark_split("wflw", split, images, keys, dense, skipped)


# -- 300W --------------------------------------------------------------------------------------


def parse_pts(path: str | os.PathLike) -> np.ndarray:
    """The [K, 2] points of an iBUG .pts file."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines()]
    try:
        start, end = lines.index("{"), lines.index("}")
    except ValueError:
        raise MalformedFileError(
            path, None, "no '{' ... '}' block", "iBUG .pts: version, n_points, {, x y lines, }"
        ) from None
    header = {
        k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[:start] if ":" in line)
    }
    count = header.get("n_points", "")
    rows = [line.split() for line in lines[start + 1 : end] if line]
    if not count.isdigit() or len(rows) != int(count) or any(len(r) != 2 for r in rows):
        raise MalformedFileError(
            path, None, f"n_points {count!r} and {len(rows)} point lines", "n_points lines of 'x y'"
        )
    try:
        return np.asarray([[float(x), float(y)] for x, y in rows], dtype=np.float64)
    except ValueError as exc:
        raise MalformedFileError(path, None, str(exc), "numeric 'x y' lines") from exc


def read_300w(root: str | os.PathLike, split: str, box_scale: float = BOX_SCALE) -> LabelledSplit:
    """The `split` of 300W: train, common, challenging, test (common + challenging, the
    "full" set) or private."""
    check_split(split, tuple(W300_FOLDERS), "300w")
    root = Path(root)
    points, images, keys, missing = [], [], [], 0
    found_folder = False
    for folder in W300_FOLDERS[split]:
        where = root / folder
        if not where.is_dir():
            continue
        found_folder = True
        for pts in sorted(where.glob("*.pts")):
            image = next((pts.with_suffix(e) for e in (".jpg", ".png") if pts.with_suffix(e).is_file()), None)
            if image is None:
                missing += 1
                continue
            xy = parse_pts(pts)
            if len(xy) != 68:
                raise MalformedFileError(pts, None, f"{len(xy)} points", "68 points (300W's markup)")
            points.append(xy)
            images.append(str(image))
            keys.append(f"{folder}/{pts.stem}")
    if not found_folder:
        raise FileNotFoundError(
            f"300w {split}: none of {[str(root / f) for f in W300_FOLDERS[split]]} exists; "
            f"check benchmark.root={str(root)!r}"
        )
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 68, 2)
    dense = DenseLabels(
        LANDMARKS,
        _names(68),
        points=xy,
        norms=interocular(xy, 36, 45),
        normaliser="inter-ocular (outer eye corners, points 36 and 45)",
        boxes=points_box(xy),
        box_scale=box_scale,
    )
    return _landmark_split("300w", split, images, keys, dense, {"missing_image": missing})


# -- AFLW-19 -----------------------------------------------------------------------------------


def _mat_strings(cells: np.ndarray) -> list[str]:
    """The strings of a MATLAB cell array as scipy.io.loadmat returns it (nested object arrays)."""
    out = []
    for cell in np.asarray(cells, dtype=object).ravel():
        value = cell
        while isinstance(value, np.ndarray):
            value = value.ravel()[0] if value.size else ""
        out.append(str(value))
    return out


def read_aflw19(
    root: str | os.PathLike,
    split: str,
    normaliser: str = "box",
    box_scale: float = BOX_SCALE,
    train_faces: int = AFLW19_TRAIN,
) -> LabelledSplit:
    """The `split` of AFLW-19: train (the first `train_faces` of `ra`: 20,000 as published), test
    (the rest, "full") or frontal (the test faces with all 19 points visible); NME by the box
    size (`normaliser="box"`, sqrt(width * height)) or its diagonal (`"diagonal"`)."""
    from scipy.io import loadmat  # plain MATLAB arrays: nothing in the file can run

    check_split(split, AFLW19_SPLITS, "aflw19")
    if normaliser not in ("box", "diagonal"):
        raise ValueError(f"aflw19 normaliser={normaliser!r}; accepted: 'box' or 'diagonal'")
    root = Path(root)
    mat_path = find_first(root, ("AFLWinfo_release.mat",), "AFLW-19 annotation")
    images_dir = find_first(root, ("data/flickr", "flickr", "."), "AFLW images")
    info = loadmat(mat_path)
    try:
        data, bbox, mask = info["data"], info["bbox"], info["mask_new"]
        names, order = _mat_strings(info["nameList"]), np.asarray(info["ra"]).astype(np.int64).ravel() - 1
    except KeyError as exc:
        raise MalformedFileError(
            mat_path, None, f"no variable {exc}", "data, bbox, mask_new, nameList, ra"
        ) from None
    n = len(names)
    if (
        data.shape != (n, 38)
        or bbox.shape != (n, 4)
        or mask.shape != (n, 19)
        or sorted(order) != list(range(n))
    ):
        raise MalformedFileError(
            mat_path,
            None,
            f"data {data.shape}, bbox {bbox.shape}, mask_new {mask.shape}, ra of {len(order)} for {n} names",
            "data [N, 38], bbox [N, 4], mask_new [N, 19] and ra a permutation of 1..N",
        )
    chosen = order[:train_faces] if split == "train" else order[train_faces:]
    if split == "frontal":
        chosen = chosen[np.all(mask[chosen] == 1, axis=1)]
    points, boxes, images, keys, outside, missing = [], [], [], [], 0, 0
    for index in chosen:
        path = inside(images_dir, names[index])
        if path is None:
            outside += 1
            continue
        if not path.is_file():
            missing += 1
            continue
        left, right, top, bottom = (float(v) for v in bbox[index])
        points.append(np.stack([data[index, :19], data[index, 19:]], axis=1))
        boxes.append((left, top, right, bottom))
        images.append(str(path))
        keys.append(f"{names[index]}#{index}")
    box = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width, height = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    norms = np.sqrt(width * height) if normaliser == "box" else np.hypot(width, height)
    dense = DenseLabels(
        LANDMARKS,
        _names(19),
        points=np.asarray(points, dtype=np.float64).reshape(-1, 19, 2),
        norms=norms,
        normaliser="box size sqrt(w*h)" if normaliser == "box" else "box diagonal",
        boxes=box,
        box_scale=box_scale,
    )
    skipped = {OUTSIDE_ROOT: outside, "missing_image": missing}
    return _landmark_split("aflw19", split, images, keys, dense, skipped, {"normaliser": normaliser})
