"""UTKFace and FairFace readers on tiny fixtures in their published layouts: parsed labels, the
seeded UTKFace split, FairFace's two paddings, skip reasons and malformed CSV rows."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from flip.benchmarks import MalformedFileError, read_fairface, read_utkface
from flip.benchmarks.fairface import AGE_GROUPS, FAIRFACE_RACES, age_group_of
from flip.benchmarks.utkface import UTKFACE_RACES, parse_utkface_name

from .helpers import write_image
from .helpers.demographics import UTK_MALFORMED, UTK_WELL_FORMED, utk_name, write_fairface, write_utkface


def test_utkface_names_parse_or_name_why_not():
    assert parse_utkface_name("26_1_3_20170117154902542.jpg.chip.jpg") == (26, 1, 3)
    for name, reason in UTK_MALFORMED.items():
        assert parse_utkface_name(name) == reason


def test_utkface_labels_skips_and_a_seeded_split_recorded_in_info(tmp_path):
    write_utkface(tmp_path / "UTKFace")
    splits = {s: read_utkface(tmp_path, s) for s in ("train", "val", "test")}
    keys = {s: split.keys for s, split in splits.items()}
    expected = {utk_name(i, *labels): labels for i, labels in enumerate(UTK_WELL_FORMED)}
    assert sorted(k for split_keys in keys.values() for k in split_keys) == sorted(
        expected
    )  # every well-formed file in one split
    assert [len(k) for k in keys.values()] == [14, 2, 4]  # 0.7 / 0.1 / 0.2 of 20
    for split in splits.values():
        assert split.task == "multitask" and split.keys == sorted(split.keys)
        assert split.skipped_by_reason == dict(sorted(Counter(UTK_MALFORMED.values()).items()))
        assert split.info == {
            "split": "seeded",
            "seed": 0,
            "fractions": {"train": 0.7, "val": 0.1, "test": 0.2},
            "counts": {"train": 14, "val": 2, "test": 4},
            "files": 20,
            "names_sha256": splits["train"].info["names_sha256"],
        }
        ages = np.array([expected[k][0] for k in split.keys], dtype=float)
        np.testing.assert_array_equal(split.values["age"], ages)
        assert split.questions["gender"][0] == ["Male", "Female"]
        np.testing.assert_array_equal(split.questions["gender"][1], [expected[k][1] for k in split.keys])
        assert split.questions["race"][0] == UTKFACE_RACES
        np.testing.assert_array_equal(split.questions["race"][1], [expected[k][2] for k in split.keys])
        # FairFace's buckets, by hand
        by_hand = [
            next(g for g, lo in reversed(list(enumerate([0, 3, 10, 20, 30, 40, 50, 60, 70]))) if a >= lo)
            for a in ages
        ]
        np.testing.assert_array_equal(split.questions["age_group"][1], by_hand)
        assert split.questions["age_group"][0] == AGE_GROUPS
    # stable: the same files, seed and fractions give the same split, from either root
    assert read_utkface(tmp_path / "UTKFace", "test").keys == keys["test"]
    other = read_utkface(tmp_path, "test", seed=1)
    assert other.info["seed"] == 1 and other.keys != keys["test"] and len(other) == 4
    custom = read_utkface(tmp_path, "train", fractions={"train": 0.5, "val": 0.25, "test": 0.25}, seed=3)
    assert len(custom) == 10 and custom.info["counts"] == {"train": 10, "val": 5, "test": 5}


def test_utkface_refuses_bad_fractions_and_an_empty_folder(tmp_path):
    write_utkface(tmp_path / "UTKFace")
    with pytest.raises(ValueError, match=r"sum to 1\.1"):
        read_utkface(tmp_path, "train", fractions={"train": 0.8, "val": 0.1, "test": 0.2})
    with pytest.raises(ValueError, match="give train, val and test"):
        read_utkface(tmp_path, "train", fractions={"train": 0.8, "test": 0.2})
    with pytest.raises(ValueError, match="utkface has no split 'dev'"):
        read_utkface(tmp_path, "dev")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no <age>_<gender>_<race>_<date>\.jpg\.chip\.jpg files"):
        read_utkface(tmp_path / "empty", "train")


def test_age_groups_are_fairface_buckets():
    ages = [0, 2, 2.9, 3, 9.5, 10, 19, 20, 29, 30, 45, 59, 60, 69.9, 70, 116, np.nan, -1]
    assert age_group_of(ages).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 7, 8, 8, -1, -1]


def test_fairface_labels_paddings_and_outside_paths(tmp_path):
    write_fairface(tmp_path)
    train = read_fairface(tmp_path, "train")
    assert train.task == "multitask" and train.keys == [
        "train/1.jpg",
        "train/2.jpg",
        "train/3.jpg",
        "train/4.jpg",
    ]
    assert train.skipped_by_reason == {"path_outside_root": 1}
    assert train.questions["gender"] == (["Male", "Female"], train.questions["gender"][1])
    np.testing.assert_array_equal(train.questions["gender"][1], [0, 1, 1, 0])
    np.testing.assert_array_equal(train.questions["race"][1], [0, 1, 2, 5])
    np.testing.assert_array_equal(train.questions["age_group"][1], [6, 4, 1, 8])
    assert train.values == {}
    assert train.images.paths[0] == str(tmp_path / "fairface-img-margin025-trainval" / "train" / "1.jpg")
    assert train.info["padding"] == 0.25
    wide = read_fairface(tmp_path, "val", padding=1.25)
    assert wide.images.paths[0] == str(tmp_path / "fairface-img-margin125-trainval" / "val" / "1.jpg")
    assert wide.info["padding"] == 1.25 and wide.questions["race"][0] == FAIRFACE_RACES
    np.testing.assert_array_equal(wide.questions["age_group"][1], [0, 3, 2])
    with pytest.raises(ValueError, match=r"padding=0.5; accepted: 0.25, 1.25"):
        read_fairface(tmp_path, "val", padding=0.5)
    with pytest.raises(ValueError, match="fairface has no split 'test'"):
        read_fairface(tmp_path, "test")


def test_fairface_reads_an_image_zip_unpacked_into_root(tmp_path):
    write_fairface(tmp_path, paddings=("025",))
    (tmp_path / "fairface-img-margin025-trainval").rename(tmp_path / "images")
    for split in ("train", "val"):
        (tmp_path / "images" / split).rename(tmp_path / split)
    val = read_fairface(tmp_path, "val")
    assert val.images.paths[0] == str(tmp_path / "val" / "1.jpg")
    only_wide = tmp_path / "wide"
    write_fairface(only_wide, paddings=("125",))
    with pytest.raises(FileNotFoundError, match="fairface-img-margin025-trainval"):
        read_fairface(only_wide, "val")


@pytest.mark.parametrize(
    ("row", "line", "message"),
    [
        (
            "val/9.jpg,20-29,Male",
            3,
            r"3 fields in 'val/9.jpg,20-29,Male'; expected 5: file,age,gender,race,service_test",
        ),
        ("val/9.jpg,70+,Male,White,True", 3, r"age is '70\+'; expected one of '0-2', '3-9'.*'more than 70'"),
        ("val/9.jpg,20-29,M,White,True", 3, r"gender is 'M'; expected one of 'Male', 'Female'"),
        (
            "val/9.jpg,20-29,Male,Asian,True",
            3,
            r"race is 'Asian'; expected one of 'East Asian'.*'Southeast Asian'",
        ),
        (",20-29,Male,White,True", 3, r"the file field is empty"),
    ],
)
def test_a_malformed_fairface_row_names_file_line_and_expectation(tmp_path, row, line, message):
    write_fairface(tmp_path, paddings=("025",))
    path = tmp_path / "fairface_label_val.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], row, *lines[2:]]) + "\n")
    with pytest.raises(MalformedFileError, match=rf"fairface_label_val.csv, line {line}: {message}") as error:
        read_fairface(tmp_path, "val")
    assert error.value.line == line and error.value.path == str(path)


def test_a_fairface_csv_with_another_header_is_refused(tmp_path):
    write_fairface(tmp_path, paddings=("025",))
    (tmp_path / "fairface_label_train.csv").write_text("image,age,sex,race\ntrain/1.jpg,3-9,Male,White\n")
    with pytest.raises(
        MalformedFileError, match=r"line 1: header is .*expected 'file,age,gender,race,service_test'"
    ):
        read_fairface(tmp_path, "train")


def test_a_utkface_symlink_out_of_the_folder_is_never_read(tmp_path):
    folder = write_utkface(tmp_path / "UTKFace")
    secret = write_image(tmp_path / "elsewhere" / "secret.jpg")
    (folder / "40_1_0_20170116174525999.jpg.chip.jpg").symlink_to(secret)
    splits = [read_utkface(tmp_path, s) for s in ("train", "val", "test")]
    assert all(s.skipped_by_reason["path_outside_root"] == 1 for s in splits)
    assert sum(len(s) for s in splits) == len(UTK_WELL_FORMED)


def test_a_fairface_csv_saved_with_a_byte_order_mark_reads_the_same(tmp_path):
    write_fairface(tmp_path, paddings=("025",))
    path = tmp_path / "fairface_label_val.csv"
    plain = read_fairface(tmp_path, "val")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    marked = read_fairface(tmp_path, "val")
    assert marked.keys == plain.keys and marked.counts() == plain.counts()
