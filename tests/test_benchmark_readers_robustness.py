"""Benchmark readers against wrong or hostile files: CelebA/LFWA headers, image names leading out
of the root, FER2013 pixel values, and skipped images counted by reason in metrics.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from flip.benchmarks import (
    CELEBA_ATTRIBUTES,
    CelebAFormatError,
    MalformedFileError,
    read_affectnet,
    read_celeba_split,
    read_fer2013,
    read_lfwa,
    read_rafdb,
)

from .helpers import compose_eval, eval_overrides, run_zeroshot, write_image


def _attribute_file(path: Path, header: list[str], names: list[str]) -> None:
    lines = [str(len(names)), " ".join(header)]
    lines += [name + " " + " ".join("1" if j % 3 else "-1" for j in range(len(header))) for name in names]
    path.write_text("\n".join(lines) + "\n")


def _celeba(root: Path, header: list[str], extra_names: tuple[str, ...] = ()) -> None:
    names = ["000001.jpg", "000002.jpg", *extra_names]
    for name in names[:2]:
        write_image(root / "img_align_celeba" / name)
    _attribute_file(root / "list_attr_celeba.txt", header, names)
    (root / "list_eval_partition.txt").write_text("".join(f"{n} 2\n" for n in names))


def _lfwa(root: Path, header: list[str], extra_names: tuple[str, ...] = ()) -> None:
    names = ["Ann/Ann_0001.jpg", "Bob/Bob_0001.jpg", *extra_names]
    for name in names[:2]:
        write_image(root / "lfw" / name)
    _attribute_file(root / "list_attr_lfwa.txt", header, names)
    (root / "list_eval_partition_lfwa.txt").write_text("".join(f"{n} 2\n" for n in names))


WRONG_HEADERS = [
    ([f"attr{i}" for i in range(40)], r"missing 40: 5_o_Clock_Shadow, .*unknown 40: attr0, attr1"),
    (list(CELEBA_ATTRIBUTES[1:]), r"missing 1: 5_o_Clock_Shadow\)"),
]


@pytest.mark.parametrize(("header", "named"), WRONG_HEADERS)
@pytest.mark.parametrize(("write", "read"), [(_celeba, read_celeba_split), (_lfwa, read_lfwa)])
def test_celeba_and_lfwa_readers_refuse_headers_that_are_not_celebas_40_names(
    tmp_path, header, named, write, read
):
    write(tmp_path, header)
    with pytest.raises(
        CelebAFormatError, match=r"line 2: the header is not CelebA's 40 attribute names"
    ) as error:
        read(tmp_path, "test")
    assert re.search(named, str(error.value))


def test_celeba_and_lfwa_skip_and_count_image_names_leading_outside_the_root(tmp_path):
    secret = tmp_path / "secret.jpg"
    write_image(secret, (1, 2, 3))
    outside = ("../../secret.jpg", str(secret), "000009.jpg")
    celeba = tmp_path / "celeba"
    _celeba(celeba, list(CELEBA_ATTRIBUTES), outside)
    (celeba / "img_align_celeba" / "000009.jpg").symlink_to(secret)
    split = read_celeba_split(celeba, "test")
    assert split.keys == ["000001.jpg", "000002.jpg"] and split.skipped_by_reason == {"path_outside_root": 3}
    assert all("secret" not in split.images.describe(i) for i in range(len(split)))

    lfwa = tmp_path / "lfwa"
    _lfwa(lfwa, list(CELEBA_ATTRIBUTES), ("../../secret.jpg", str(secret), "Eve/Eve_0001.jpg"))
    (lfwa / "lfw" / "Eve").mkdir()
    (lfwa / "lfw" / "Eve" / "Eve_0001.jpg").symlink_to(secret)
    split = read_lfwa(lfwa, "test")
    assert len(split) == 2 and split.skipped_by_reason == {"path_outside_root": 3}


def _rafdb(root: Path, escape_to: Path | None = None, missing: bool = False) -> None:
    lines = []
    for label in range(1, 8):
        name = f"test_{label:04d}.jpg"
        write_image(root / "Image" / "aligned" / f"test_{label:04d}_aligned.jpg", (30 * label, 90, 120))
        lines.append(f"{name} {label}")
    if escape_to is not None:
        (root / "Image" / "aligned" / "test_0008_aligned.jpg").symlink_to(escape_to)
        lines.append("test_0008.jpg 1")
    if missing:
        lines.append("test_0009.jpg 2")  # listed, no image: unreadable at evaluation
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")


def test_rafdb_and_affectnet_skip_and_count_image_names_leading_outside_the_root(tmp_path):
    secret = tmp_path / "secret.jpg"
    write_image(secret, (1, 2, 3))
    _rafdb(tmp_path / "rafdb", escape_to=secret)
    split = read_rafdb(tmp_path / "rafdb", "test")
    assert len(split) == 7 and split.skipped_by_reason == {"path_outside_root": 1}

    root = tmp_path / "affectnet"
    write_image(root / "Manually_Annotated_Images" / "1" / "a.png")
    columns = ["face_x", "face_y", "face_width", "face_height", "facial_landmarks", "expression"]
    header = ",".join(["subDirectory_filePath", *columns, "valence", "arousal"])
    rows = ["1/a.png", "../../secret.jpg", str(secret)]
    body = "".join(f'{p},0,0,10,10,"1;2",1,0.1,0.2\n' for p in rows) + '1/a.png,0,0,10,10,"1;2",9,0,0\n'
    (root / "training.csv").write_text(header + "\n" + body)
    split = read_affectnet(root, "train")
    assert len(split) == 1 and split.skipped_by_reason == {"path_outside_root": 2, "not_in_protocol": 1}
    assert split.skipped == 3


def test_a_fer2013_pixel_out_of_range_is_named_with_its_value_and_line(tmp_path):
    good = " ".join(["128"] * 2304)
    bad = " ".join(["128"] * 17 + ["300"] + ["128"] * 2286)
    (tmp_path / "fer2013.csv").write_text(f"emotion,pixels,Usage\n3,{good},Training\n4,{bad},Training\n")
    with pytest.raises(MalformedFileError, match=r"fer2013.csv, line 3: pixel 17 is 300, outside 0..255"):
        read_fer2013(tmp_path, "train")
    (tmp_path / "fer2013.csv").write_text(f"emotion,pixels,Usage\n3,{good} 128,Training\n")
    with pytest.raises(MalformedFileError, match=r"line 2: 2305 pixel values; expected 2304"):
        read_fer2013(tmp_path, "train")


def test_images_skipped_at_evaluation_are_counted_by_reason_in_metrics_json(tmp_path, tiny_ckpt):
    secret = tmp_path / "secret.jpg"
    write_image(secret, (1, 2, 3))
    _rafdb(tmp_path / "rafdb", escape_to=secret, missing=True)
    cfg = compose_eval(
        "eval_zeroshot", tmp_path, *eval_overrides(tmp_path, tiny_ckpt, "rafdb", tmp_path / "rafdb")
    )
    run_zeroshot(cfg)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["n_test"] == 7
    assert written["skipped"] == {"test": {"path_outside_root": 1, "unreadable_image": 1}}
    assert (
        "images left out of these metrics: test: path_outside_root 1, unreadable_image 1"
        in (tmp_path / "out" / "report.md").read_text()
    )

    # the same for any reader: a class-per-folder benchmark with a corrupt file
    folder = tmp_path / "folderbench"
    for name, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        for i in range(3):
            write_image(folder / "test" / name / f"{i}.png", colour)
    (folder / "test" / "a" / "broken.png").write_bytes(b"not a png")
    overrides = eval_overrides(tmp_path, tiny_ckpt, "folder", folder, out="folder_out")
    run_zeroshot(compose_eval("eval_zeroshot", tmp_path, *overrides))
    written = json.loads((tmp_path / "folder_out" / "metrics.json").read_text())
    assert written["n_test"] == 6 and written["skipped"] == {"test": {"unreadable_image": 1}}
    assert np.isfinite(written["summary"]["accuracy"])
