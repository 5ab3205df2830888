"""LabelledSplit's invariants: what every reader's output must satisfy, and what subsetting keeps."""

from __future__ import annotations

import numpy as np
import pytest

from flip.benchmarks.base import LabelledSplit, Pairs, PixelArrays


def _images(n: int) -> PixelArrays:
    return PixelArrays(np.zeros((n, 2, 2), np.uint8), tuple(f"img{i}" for i in range(n)))


def _verification(n: int, pairs: Pairs) -> LabelledSplit:
    return LabelledSplit(
        "lfw",
        "test",
        "verification",
        [],
        np.zeros((n, 0), np.int8),
        _images(n),
        [f"k{i}" for i in range(n)],
        pairs=pairs,
    )


def test_pairs_lose_the_pairs_of_dropped_images_and_are_renumbered():
    pairs = Pairs(
        index=np.array([[0, 1], [2, 3], [1, 3], [4, 0]]),
        same=np.array([True, False, True, False]),
        fold=np.array([0, 0, 1, 1]),
    )
    split = _verification(5, pairs)
    kept = split.subset([1, 3, 4, 0])  # image 2 unreadable: only the pair (2, 3) goes
    assert kept.keys == ["k1", "k3", "k4", "k0"]
    # old (0,1) -> new (3,0); (1,3) -> (0,1); (4,0) -> (2,3)
    assert kept.pairs.index.tolist() == [[3, 0], [0, 1], [2, 3]]
    assert kept.pairs.same.tolist() == [True, True, False]
    assert kept.pairs.fold.tolist() == [0, 1, 1]
    assert kept.counts() == {"same": 2, "different": 1}


def test_multitask_values_and_questions_follow_a_subset():
    age = np.array([3.0, np.nan, 40.0, 71.0])
    gender = np.array([0, 1, -1, 1])
    split = LabelledSplit(
        "utkface",
        "test",
        "multitask",
        [],
        np.zeros((4, 0), np.int8),
        _images(4),
        ["a", "b", "c", "d"],
        questions={"gender": (["male", "female"], gender)},
        values={"age": age},
        info={"seed": 0},
    )
    assert split.counts() == {"gender/male": 1, "gender/female": 2, "age labelled": 3}
    part = split.subset([3, 1])
    assert part.values["age"].tolist()[0] == 71.0 and np.isnan(part.values["age"][1])
    assert part.questions["gender"][1].tolist() == [1, 1]
    assert part.info == {"seed": 0}


def test_inconsistent_labels_are_refused_naming_the_label():
    with pytest.raises(ValueError, match="'age' has shape"):
        LabelledSplit(
            "utkface",
            "test",
            "multitask",
            [],
            np.zeros((3, 0), np.int8),
            _images(3),
            ["a", "b", "c"],
            values={"age": np.zeros(2)},
        )
    with pytest.raises(ValueError, match="pairs are given exactly when"):
        LabelledSplit("lfw", "test", "verification", [], np.zeros((2, 0), np.int8), _images(2), ["a", "b"])
    with pytest.raises(ValueError, match=r"expected \[P, 2\]"):
        Pairs(np.zeros((3, 3), np.int64), np.zeros(3, bool), np.zeros(3, np.int64))
