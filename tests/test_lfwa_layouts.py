"""LFWA in both layouts users hold it in: CelebA's text lists and the CSVs FLIP's released probe reads."""

from __future__ import annotations

import numpy as np
import pytest

from flip.benchmarks import CELEBA_ATTRIBUTES, read_lfwa
from flip.benchmarks.base import MalformedFileError
from flip.benchmarks.celeba import CelebAFormatError

from .helpers import write_image

TRAIN = ["Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Zoe/Zoe_0002.jpg"]
TEST = ["Abba_Eban/Abba_Eban_0001.jpg", "Abba_Eban/Abba_Eban_0002.jpg", "Bo/Bo_0001.jpg"]


def _values(index: int) -> list[int]:
    """Image `index`'s 40 labels (1 present, 0 absent): a pattern that differs per image and column."""
    return [int((index + j) % 3 == 0) for j in range(40)]


def write_flip_csv(root, negative: str = "0", header_first: str = "image_id") -> None:
    """FLIP's layout: list_attr_lfwa.csv (train) and list_attr_lfwa_test.csv (test), each a header row
    (as pandas reads it) then `<image>,<40 values>`; images under lfw/."""
    for file, names, offset in (("list_attr_lfwa.csv", TRAIN, 0), ("list_attr_lfwa_test.csv", TEST, 10)):
        rows = [",".join([header_first, *CELEBA_ATTRIBUTES])]
        for i, name in enumerate(names):
            values = [("1" if v else negative) for v in _values(offset + i)]
            rows.append(",".join([name, *values]))
        (root / file).write_text("\n".join(rows) + "\n")
    for name in TRAIN + TEST:
        write_image(root / "lfw" / name)


def write_celeba_text(root) -> None:
    """CelebA's text layout: count, header, `<image> 1 -1 ...`, and a partition file (0 train, 2 test)."""
    names = TRAIN + TEST
    lines = [str(len(names)), " ".join(CELEBA_ATTRIBUTES)]
    offsets = [0, 1, 10, 11, 12]
    lines += [
        f"{n}  " + " ".join("1" if v else "-1" for v in _values(o))
        for n, o in zip(names, offsets, strict=True)
    ]
    (root / "list_attr_lfwa.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition_lfwa.txt").write_text(
        "".join(f"{n} {0 if n in TRAIN else 2}\n" for n in names)
    )
    for name in names:
        write_image(root / "lfw" / name)


@pytest.mark.parametrize("negative", ["0", "-1"])
@pytest.mark.parametrize("write", [write_flip_csv, write_celeba_text])
def test_both_layouts_give_the_same_splits_and_labels(tmp_path, write, negative):
    if write is write_flip_csv:
        write(tmp_path, negative)
        layout, lists = "flip_csv", ("list_attr_lfwa.csv", "list_attr_lfwa_test.csv")
    else:
        write(tmp_path)
        layout, lists = "celeba_text", ("list_eval_partition_lfwa.txt",) * 2
    train, test = read_lfwa(tmp_path, "train"), read_lfwa(tmp_path, "test")
    assert train.keys == TRAIN and test.keys == TEST  # train is the train list, never the test list
    assert train.label_names == list(CELEBA_ATTRIBUTES)
    np.testing.assert_array_equal(train.targets, [_values(0), _values(1)])
    np.testing.assert_array_equal(test.targets, [_values(10), _values(11), _values(12)])
    assert (train.info, test.info) == (
        {"layout": layout, "list": lists[0]},
        {"layout": layout, "list": lists[1]},
    )
    assert test.images.paths[2] == str(tmp_path / "lfw" / "Bo" / "Bo_0001.jpg")
    assert test.counts()["Male"] == sum(_values(i)[20] for i in (10, 11, 12))


def test_the_csv_header_may_order_the_attributes_its_own_way(tmp_path):
    write_flip_csv(tmp_path)
    path = tmp_path / "list_attr_lfwa_test.csv"
    rows = [line.split(",") for line in path.read_text().splitlines()]
    order = [0, *range(40, 0, -1)]  # the 40 attribute columns reversed, header and values alike
    path.write_text("\n".join(",".join(row[i] for i in order) for row in rows) + "\n")
    test = read_lfwa(tmp_path, "test")
    assert test.label_names == list(reversed(CELEBA_ATTRIBUTES))
    np.testing.assert_array_equal(test.targets[0], list(reversed(_values(10))))


def test_the_layout_can_be_named_and_a_csv_has_no_val_split(tmp_path):
    write_celeba_text(tmp_path)
    write_flip_csv(tmp_path)  # both present: auto picks FLIP's CSVs, a named layout wins
    assert read_lfwa(tmp_path, "test").info["layout"] == "flip_csv"
    assert read_lfwa(tmp_path, "test", layout="celeba_text").info["layout"] == "celeba_text"
    with pytest.raises(ValueError, match="no split 'val', only train, test"):
        read_lfwa(tmp_path, "val")
    with pytest.raises(ValueError, match="layout 'mat' is not one of auto, celeba_text, flip_csv"):
        read_lfwa(tmp_path, "test", layout="mat")
    (tmp_path / "list_attr_lfwa.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"LFWA train list .*list_attr_lfwa.csv' does not exist"):
        read_lfwa(tmp_path, "train")


def _break_line(line: int, edit):
    def breaks(path):
        lines = path.read_text().splitlines()
        lines[line - 1] = edit(lines[line - 1])
        path.write_text("\n".join(lines) + "\n")

    return breaks


@pytest.mark.parametrize(
    ("breaks", "error", "message"),
    [
        (
            _break_line(3, lambda s: s.rsplit(",", 1)[0]),
            MalformedFileError,
            r"line 3: 40 columns; expected an image",
        ),
        (_break_line(2, lambda s: s[:-1] + "2"), MalformedFileError, r"line 2: attribute Young of .* is '2'"),
        (_break_line(4, lambda s: s[:-1] + "x"), MalformedFileError, r"line 4: attribute Young"),
        (
            _break_line(3, lambda s: "Abba_Eban/Abba_Eban_0001.jpg" + s[s.index(",") :]),
            MalformedFileError,
            "line 3: .* repeated",
        ),
        (
            _break_line(1, lambda s: s.replace("Young", "Old")),
            CelebAFormatError,
            r"line 1: the header is not CelebA's",
        ),
        (lambda path: path.write_text("\n\n"), MalformedFileError, r"test.csv: the file is empty"),
    ],
)
def test_a_malformed_csv_fails_naming_the_file_and_line(tmp_path, breaks, error, message):
    write_flip_csv(tmp_path)
    breaks(tmp_path / "list_attr_lfwa_test.csv")
    with pytest.raises(error, match=message) as raised:
        read_lfwa(tmp_path, "test")
    assert "list_attr_lfwa_test.csv" in str(raised.value)
