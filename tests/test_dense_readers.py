"""The parsing and landmark readers on fixtures in each published layout (LaPa, CelebAMask-HQ,
WFLW, 300W, AFLW-19, FaceShapes with parts): what they read, their splits, their NME normalisers
against direct computations on the raw files, and the files they refuse."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from flip.benchmarks import (
    read_300w,
    read_aflw19,
    read_celebamask_hq,
    read_faceshapes_dense,
    read_lapa,
    read_wflw,
)
from flip.benchmarks.base import MalformedFileError
from flip.benchmarks.dense import IGNORE, Crop, label_map, points_from_crop, points_to_crop
from flip.benchmarks.parsing import CELEBAMASK_CLASSES, LAPA_CLASSES
from flip.data.faceshapes import ensure_faceshapes
from flip.evaluation.dense_metrics import landmark_scores

from .helpers import write_image

# -- parsing -----------------------------------------------------------------------------------


def _png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), "L").save(path)


def test_lapa_reads_images_with_their_label_pngs(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for split in ("train", "val", "test"):
        for i in range(3):
            write_image(tmp_path / "LaPa" / split / "images" / f"{split}_{i}.jpg", size=(12, 8))
            written[split, i] = rng.integers(0, 11, size=(8, 12))
            _png(tmp_path / "LaPa" / split / "labels" / f"{split}_{i}.png", written[split, i])
    write_image(tmp_path / "LaPa" / "test" / "images" / "no_label.jpg")
    test = read_lapa(tmp_path, "test")
    assert test.task == "parsing" and test.label_names == list(LAPA_CLASSES)
    assert test.keys == ["test_0", "test_1", "test_2"]
    assert test.skipped_by_reason == {"missing_label": 1}
    for i in range(3):
        np.testing.assert_array_equal(test.dense.masks.load(i), written["test", i])
        assert test.images.size(i) == (12, 8)
    assert test.subset([2]).dense.masks.describe(0).endswith("test_2.png")
    with pytest.raises(ValueError, match="has no split 'dev'"):
        read_lapa(tmp_path, "dev")


def _celebamask(root, paint_overlap: bool = True) -> None:
    """Six CelebA-HQ faces: hq i is CelebA's image 0000{i+1}.jpg; CelebA puts 1, 2 in train,
    3, 4 in val, 5, 6 in test. Face 4 has no image."""
    lines = ["idx orig_idx orig_file"] + [f"{i} {i + 10} {i + 1:06d}.jpg" for i in range(6)]
    (root / "CelebA-HQ-to-CelebA-mapping.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text("\n".join(lines) + "\n")
    partition = [f"{i + 1:06d}.jpg {i // 2}" for i in range(6)] + ["000099.jpg 0"]
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    for i in range(6):
        if i != 4:
            write_image(root / "CelebA-HQ-img" / f"{i}.jpg", size=(1024, 1024))
        skin = np.zeros((512, 512), np.uint8)
        skin[100:300, 100:300] = 255
        neck = np.zeros((512, 512), np.uint8)
        neck[250:400, 150:250] = 255  # overlaps the skin on rows 250..299
        _png(root / "CelebAMask-HQ-mask-anno" / "0" / f"{i:05d}_skin.png", skin)
        _png(root / "CelebAMask-HQ-mask-anno" / "0" / f"{i:05d}_neck.png", neck)


def test_celebamask_hq_splits_through_celebas_partition_and_paints_in_order(tmp_path):
    _celebamask(tmp_path)
    splits = {s: read_celebamask_hq(tmp_path, s) for s in ("train", "val", "test")}
    assert {s: split.keys for s, split in splits.items()} == {
        "train": ["0", "1"],
        "val": ["2", "3"],
        "test": ["5"],
    }
    assert splits["test"].skipped_by_reason == {"missing_image": 1}
    assert splits["train"].label_names == list(CELEBAMASK_CLASSES)
    skin, neck = CELEBAMASK_CLASSES.index("skin"), CELEBAMASK_CLASSES.index("neck")
    farl = splits["train"].dense.masks.load(0)
    official = read_celebamask_hq(tmp_path, "train", paint_order="official").dense.masks.load(0)
    assert farl[200, 200] == official[200, 200] == skin and farl[350, 200] == official[350, 200] == neck
    assert farl[275, 200] == skin and official[275, 200] == neck  # the overlap: later on top
    assert farl[0, 0] == 0
    assert splits["train"].images.size(0) == (1024, 1024)


def test_celebamask_hq_needs_celebas_partition_file(tmp_path):
    _celebamask(tmp_path)
    moved = tmp_path / "elsewhere.txt"
    (tmp_path / "list_eval_partition.txt").rename(moved)
    with pytest.raises(FileNotFoundError, match=r"list_eval_partition\.txt"):
        read_celebamask_hq(tmp_path, "train")
    assert read_celebamask_hq(tmp_path, "train", partition=moved).keys == ["0", "1"]


def test_label_maps_follow_the_crop_at_any_mask_resolution():
    mask = np.arange(16, dtype=np.uint8).reshape(4, 4)  # a 4x4 mask of an 8x8 image
    whole = label_map(mask, (8, 8), Crop(0, 0, 8), 4)
    np.testing.assert_array_equal(whole, mask)
    padded = label_map(mask, (8, 8), Crop(-4, 0, 8), 4)  # half the square is left of the image
    assert (padded[:, :2] == IGNORE).all()
    np.testing.assert_array_equal(padded[:, 2:], mask[:, :2])
    fine = label_map(mask, (8, 8), Crop(0, 0, 8), 8)  # nearest: each mask pixel covers 2x2
    np.testing.assert_array_equal(fine, mask.repeat(2, 0).repeat(2, 1))
    points = np.array([[1.0, 2.0], [7.5, 3.25]])
    crop = Crop(-3, 1, 10)
    np.testing.assert_allclose(points_to_crop(points, crop), [[0.4, 0.1], [1.05, 0.225]])
    np.testing.assert_allclose(points_from_crop(points_to_crop(points, crop), crop), points)


# -- landmarks ---------------------------------------------------------------------------------


def _nme_check(split, raw_points: np.ndarray, normaliser) -> None:
    """The split's NME of some predictions equals a direct computation with `normaliser`."""
    rng = np.random.default_rng(5)
    predicted = raw_points + rng.normal(0, 3, size=raw_points.shape)
    direct = [
        np.mean(np.linalg.norm(predicted[i] - raw_points[i], axis=1)) / normaliser(i)
        for i in range(len(raw_points))
    ]
    np.testing.assert_allclose(split.dense.points, raw_points)
    nme = landmark_scores(predicted, split.dense.points, split.dense.norms)["summary"]["nme"]
    assert nme == pytest.approx(np.mean(direct))


def test_wflw_reads_its_list_and_normalises_by_points_60_and_72(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "WFLW_annotations" / "list_98pt_rect_attr_train_test"
    folder.mkdir(parents=True)
    points = rng.uniform(10, 90, size=(3, 98, 2))
    lines = []
    for i in range(3):
        flags = [1, 0, 0, 0, 0, 0] if i == 1 else [0] * 6
        path = f"0--Parade/face_{i}.jpg"
        write_image(tmp_path / "WFLW_images" / path, size=(100, 100))
        values = [f"{v:.6f}" for v in points[i].ravel()] + ["5", "6", "95", "90"] + [str(f) for f in flags]
        lines.append(" ".join([*values, path]))
    (folder / "list_98pt_rect_attr_test.txt").write_text("\n".join(lines) + "\n")
    test = read_wflw(tmp_path, "test")
    assert test.task == "landmarks" and len(test.label_names) == 98 and len(test) == 3
    np.testing.assert_allclose(test.dense.boxes[0], [5, 6, 95, 90])
    _nme_check(test, np.round(points, 6), lambda i: np.linalg.norm(points[i, 60] - points[i, 72]))
    pose = read_wflw(tmp_path, "test_pose")
    assert pose.keys == [test.keys[1]]
    crop = test.dense.crop(0, 100, 100)  # the box's longer side (90 px) x 1.25, on the box's centre
    assert crop == Crop(50 - 56, 48 - 56, 112)
    lines[2] = " ".join(lines[2].split()[:150])
    (folder / "list_98pt_rect_attr_test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(MalformedFileError, match=r"line 3: 150 fields"):
        read_wflw(tmp_path, "test")


def _pts(path, points: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points)
    path.write_text(f"version: 1\nn_points:  {len(points)}\n{{\n{body}\n}}\n")


def test_300w_reads_ibug_pts_by_folder_and_normalises_by_the_outer_eye_corners(tmp_path):
    rng = np.random.default_rng(2)
    folders = {
        "afw": 2,
        "helen/trainset": 1,
        "lfpw/trainset": 1,
        "helen/testset": 1,
        "lfpw/testset": 1,
        "ibug": 2,
    }
    raw = {}
    for folder, count in folders.items():
        for i in range(count):
            raw[folder, i] = np.round(rng.uniform(20, 80, size=(68, 2)), 3)
            _pts(tmp_path / folder / f"image_{i}.pts", raw[folder, i])
            write_image(
                tmp_path / folder / f"image_{i}.{'png' if folder == 'ibug' else 'jpg'}", size=(100, 100)
            )
    _pts(tmp_path / "ibug" / "no_image.pts", raw["ibug", 0])
    sizes = {s: len(read_300w(tmp_path, s)) for s in ("train", "common", "challenging", "test")}
    assert sizes == {"train": 4, "common": 2, "challenging": 2, "test": 4}
    test = read_300w(tmp_path, "test")
    assert test.skipped_by_reason == {"missing_image": 1}
    assert test.keys == ["helen/testset/image_0", "lfpw/testset/image_0", "ibug/image_0", "ibug/image_1"]
    order = [("helen/testset", 0), ("lfpw/testset", 0), ("ibug", 0), ("ibug", 1)]
    points = np.stack([raw[k] for k in order])
    _nme_check(test, points, lambda i: np.linalg.norm(points[i, 36] - points[i, 45]))
    np.testing.assert_allclose(test.dense.boxes[0], [*points[0].min(0), *points[0].max(0)])
    _pts(tmp_path / "ibug" / "image_1.pts", raw["ibug", 1][:60])
    (tmp_path / "ibug" / "image_1.pts").write_text(
        (tmp_path / "ibug" / "image_1.pts").read_text().replace("n_points:  60", "n_points:  68")
    )
    with pytest.raises(MalformedFileError, match=r"image_1\.pts.*n_points '68' and 60 point lines"):
        read_300w(tmp_path, "challenging")


def test_aflw19_reads_the_mat_file_and_normalises_by_the_box_size(tmp_path):
    rng = np.random.default_rng(3)
    n = 6
    names = np.empty((n, 1), dtype=object)
    for i in range(n):
        names[i, 0] = np.array([f"{i % 3}/image{i:05d}.jpg"])
        write_image(tmp_path / "data" / "flickr" / f"{i % 3}" / f"image{i:05d}.jpg", size=(120, 120))
    xy = rng.uniform(20, 100, size=(n, 19, 2))
    boxes = np.stack(
        [rng.uniform(5, 30, n), rng.uniform(90, 115, n), rng.uniform(5, 30, n), rng.uniform(90, 115, n)], 1
    )
    visible = np.ones((n, 19))
    visible[5, 3] = 0
    ra = np.array([[3, 1, 6, 2, 5, 4]], dtype=np.float64)  # 1-based, as MATLAB wrote it
    savemat(
        tmp_path / "AFLWinfo_release.mat",
        {
            "data": np.concatenate([xy[..., 0], xy[..., 1]], 1),
            "bbox": boxes,
            "mask_new": visible,
            "nameList": names,
            "ra": ra,
        },
    )
    train = read_aflw19(tmp_path, "train", train_faces=3)
    test = read_aflw19(tmp_path, "test", train_faces=3)
    assert [k.split("#")[1] for k in train.keys] == ["2", "0", "5"]
    assert [k.split("#")[1] for k in test.keys] == ["1", "4", "3"]
    assert [k.split("#")[1] for k in read_aflw19(tmp_path, "frontal", train_faces=3).keys] == ["1", "4", "3"]
    assert len(read_aflw19(tmp_path, "frontal", train_faces=2)) == 3  # face 5 (not all visible) left out
    order = [1, 4, 3]
    box = boxes[order]  # left right top bottom
    _nme_check(test, xy[order], lambda i: np.sqrt((box[i, 1] - box[i, 0]) * (box[i, 3] - box[i, 2])))
    diagonal = read_aflw19(tmp_path, "test", normaliser="diagonal", train_faces=3)
    _nme_check(diagonal, xy[order], lambda i: np.hypot(box[i, 1] - box[i, 0], box[i, 3] - box[i, 2]))
    savemat(
        tmp_path / "AFLWinfo_release.mat",
        {"data": xy[:, :, 0], "bbox": boxes, "mask_new": visible, "nameList": names, "ra": ra},
    )
    with pytest.raises(MalformedFileError, match=r"data \(6, 19\)"):
        read_aflw19(tmp_path, "test")


# -- FaceShapes with parts -----------------------------------------------------------------------


def test_faceshapes_dense_benchmark_reads_masks_and_points(tmp_path):
    ensure_faceshapes(
        tmp_path / "fs",
        {"train": 4, "test": 3},
        samples_per_shard=4,
        image_size=48,
        num_workers=1,
        parts=True,
    )
    parsing = read_faceshapes_dense(tmp_path / "fs", "test", "parsing")
    landmarks = read_faceshapes_dense(tmp_path / "fs", "test", "landmarks")
    assert parsing.keys == landmarks.keys == ["test_000000", "test_000001", "test_000002"]
    mask = parsing.dense.masks.load(0)
    assert mask.shape == (48, 48) and mask.max() < len(parsing.label_names)
    eye = parsing.label_names.index("eye")
    x, y = landmarks.dense.points[0, 0]
    if mask[int(y), int(x)] != parsing.label_names.index("glasses"):  # sunglasses hide the eye
        assert mask[int(y), int(x)] == eye
    np.testing.assert_allclose(
        landmarks.dense.norms,
        np.linalg.norm(landmarks.dense.points[:, 0] - landmarks.dense.points[:, 1], axis=1),
    )
    ensure_faceshapes(tmp_path / "plain", {"test": 2}, samples_per_shard=4, image_size=48, num_workers=1)
    with pytest.raises(ValueError, match="generated without parts"):
        read_faceshapes_dense(tmp_path / "plain", "test")
