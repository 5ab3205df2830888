"""Face verification: LFW / CALFW / CPLFW readers on their published layouts, the 10-fold protocol
against scikit-learn, the flip test against embeddings summed by hand, and eval/verification.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import KFold

from flip.benchmarks import MalformedFileError, read_calfw, read_cplfw, read_lfw
from flip.benchmarks.base import ImageFiles
from flip.benchmarks.verification import MISSING_IMAGE, OUTSIDE_ROOT
from flip.evaluation.features import FeatureCache, extract_image_features, split_features
from flip.evaluation.verification import best_threshold, verification_metrics

from .helpers import compose_eval, eval_overrides, run_verification, write_square

PEOPLE = {
    "Ann_Lee": (220, 30, 30),
    "Bo_Chen": (30, 200, 40),
    "Cy_Diaz": (30, 40, 220),
    "Di_Eno": (200, 200, 40),
    "Ed_Fox": (200, 40, 200),
    "Flo_Gil": (40, 200, 200),
}
NAMES = list(PEOPLE)
SETS, PER_SET = 10, 2  # 10 folds of 2 same + 2 different pairs


def listed_pairs() -> list[tuple[str, int, str, int, bool, int]]:
    """(name1, n1, name2, n2, same, fold) in LFW's file order: per set, the matched then the mismatched."""
    pairs = []
    for k in range(SETS):
        for j in range(PER_SET):
            name = NAMES[(k + j) % 6]
            pairs.append((name, 1 + (k + j) % 3, name, 2 + (k + j) % 3, True, k))
        for j in range(PER_SET):
            pairs.append(
                (NAMES[(k + j) % 6], 1 + k % 4, NAMES[(k + 2 * j + 1) % 6], 1 + (k + 1) % 4, False, k)
            )
    return pairs


def lfw_lines(pairs) -> list[str]:
    lines = [f"{SETS}\t{PER_SET}"]
    for a, n1, b, n2, same, _ in pairs:
        lines.append(f"{a}\t{n1}\t{n2}" if same else f"{a}\t{n1}\t{b}\t{n2}")
    return lines


def write_people(folder: Path, name_of) -> None:
    """Four images of each person: the person's colour, moved per image and noisy per pixel, so that
    some pairs of one person look less alike than some pairs of two (no accuracy of 1 by colour)."""
    for p, (name, colour) in enumerate(PEOPLE.items()):
        for n in range(1, 5):
            shift = np.random.default_rng(10 * p + n).normal(0, 70, 3)
            write_square(folder / name_of(name, n), tuple(np.clip(colour + shift, 0, 255)), seed=10 * p + n)


def write_lfw(root: Path, folder: str = "lfw", lines: list[str] | None = None) -> Path:
    write_people(root / folder, lambda name, n: f"{name}/{name}_{n:04d}.jpg")
    (root / "pairs.txt").write_text("\n".join(lines or lfw_lines(listed_pairs())) + "\n")
    return root


def line_file(name: str, number: int, benchmark: str) -> str:
    return f"{name}_{number:04d}.jpg" if benchmark == "calfw" else f"{name}_{number}.jpg"


def two_line_pairs(benchmark: str, order: str = "fold after fold") -> list[str]:
    """CALFW / CPLFW pairs file lines: per fold its same then different pairs (same labelled 1),
    or every same pair first (labelled with its fold 1..10) and then every different one."""
    pairs = listed_pairs()
    if order != "fold after fold":
        pairs = [p for p in pairs if p[4]] + [p for p in pairs if not p[4]]
    lines = []
    for a, n1, b, n2, same, fold in pairs:
        label = (1 if order == "fold after fold" else fold + 1) if same else 0
        lines += [f"{line_file(a, n1, benchmark)} {label}", f"{line_file(b, n2, benchmark)} {label}"]
    return lines


def write_line_pairs(root: Path, benchmark: str, lines: list[str] | None = None) -> Path:
    write_people(root / "aligned images", lambda name, n: line_file(name, n, benchmark))
    pairs_file = root / f"pairs_{benchmark.upper()}.txt"
    pairs_file.write_text("\n".join(lines or two_line_pairs(benchmark)) + "\n")
    return root


READERS = {"lfw": read_lfw, "calfw": read_calfw, "cplfw": read_cplfw}


def as_listed(split) -> list[tuple[str, str, bool, int]]:
    pairs = split.pairs
    return [
        (split.keys[i], split.keys[j], bool(s), int(f))
        for (i, j), s, f in zip(pairs.index, pairs.same, pairs.fold, strict=True)
    ]


# -- readers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["lfw", "lfw-deepfunneled", "lfw-deepfunneled/lfw-deepfunneled"])
def test_lfw_pairs_are_read_with_their_sets_as_folds(tmp_path, folder):
    split = read_lfw(write_lfw(tmp_path, folder), "test")
    assert split.task == "verification" and split.split == "test" and split.targets.shape == (len(split), 0)
    expected = [
        (f"{a}/{a}_{n1:04d}.jpg", f"{b}/{b}_{n2:04d}.jpg", same, fold)
        for a, n1, b, n2, same, fold in listed_pairs()
    ]
    assert as_listed(split) == expected
    assert as_listed(split)[:3] == [
        ("Ann_Lee/Ann_Lee_0001.jpg", "Ann_Lee/Ann_Lee_0002.jpg", True, 0),
        ("Bo_Chen/Bo_Chen_0002.jpg", "Bo_Chen/Bo_Chen_0003.jpg", True, 0),
        ("Ann_Lee/Ann_Lee_0001.jpg", "Bo_Chen/Bo_Chen_0002.jpg", False, 0),
    ]
    assert split.counts() == {"same": 20, "different": 20}
    assert np.bincount(split.pairs.fold).tolist() == [4] * 10
    assert [int(split.pairs.same[split.pairs.fold == k].sum()) for k in range(10)] == [2] * 10
    # each image once, at the path its key names, in the folder that exists
    assert len(set(split.keys)) == len(split.keys) == len({n for p in expected for n in p[:2]})
    assert all(p == str(tmp_path / folder / k) for p, k in zip(split.images.paths, split.keys, strict=True))
    assert split.info["image_folder"] == folder and split.info["pairs_listed"] == 40
    assert split.info["folds"] == 10 and split.skipped_by_reason == {}


def test_lfw_prefers_lfw_and_takes_the_folder_it_is_told(tmp_path):
    write_lfw(tmp_path, "lfw")
    write_lfw(tmp_path, "lfw-deepfunneled")
    assert read_lfw(tmp_path).info["image_folder"] == "lfw"
    assert read_lfw(tmp_path, images="lfw-deepfunneled").info["image_folder"] == "lfw-deepfunneled"
    with pytest.raises(ValueError, match="images='funneled'; accepted: auto, lfw, lfw-deepfunneled"):
        read_lfw(tmp_path, images="funneled")
    with pytest.raises(ValueError, match="lfw has no split 'train'"):
        read_lfw(tmp_path, "train")


@pytest.mark.parametrize("benchmark", ["calfw", "cplfw"])
@pytest.mark.parametrize("order", ["fold after fold", "same pairs first"])
def test_calfw_and_cplfw_pairs_are_folded_by_file_order(tmp_path, benchmark, order):
    root = write_line_pairs(tmp_path, benchmark, two_line_pairs(benchmark, order))
    split = READERS[benchmark](root, "test")
    expected = [
        (line_file(a, n1, benchmark), line_file(b, n2, benchmark), same, fold)
        for a, n1, b, n2, same, fold in listed_pairs()
    ]
    if order != "fold after fold":
        expected = [p for p in expected if p[2]] + [p for p in expected if not p[2]]
    assert as_listed(split) == expected  # the same pairs in the same folds, whichever the order
    assert split.counts() == {"same": 20, "different": 20}
    assert [int(split.pairs.same[split.pairs.fold == k].sum()) for k in range(10)] == [2] * 10
    assert np.bincount(split.pairs.fold).tolist() == [4] * 10
    assert split.info["image_folder"] == "aligned images" and split.info["pairs_listed"] == 40
    assert split.info["fold_order"] == (
        "fold after fold"
        if order == "fold after fold"
        else "same pairs first, folds by order within each kind"
    )


def test_pairs_with_missing_or_escaping_images_are_skipped_and_counted(tmp_path):
    lines = lfw_lines(listed_pairs())
    lines[-1] = "..\t1\tAnn_Lee\t1"  # the last mismatched pair: lfw/../.._0001.jpg, out of lfw/
    write_lfw(tmp_path, lines=lines)
    write_square(tmp_path / ".._0001.jpg", (0, 0, 0), seed=0)  # it exists, and is still refused
    (tmp_path / "lfw" / "Bo_Chen" / "Bo_Chen_0003.jpg").unlink()
    uses_missing = sum(
        "Bo_Chen_0003.jpg" in (f"{a}_{n1:04d}.jpg", f"{b}_{n2:04d}.jpg")
        for a, n1, b, n2, _, _ in listed_pairs()[:-1]
    )
    assert uses_missing >= 2
    split = read_lfw(tmp_path)
    assert split.skipped_by_reason == {MISSING_IMAGE: uses_missing, OUTSIDE_ROOT: 1}
    assert len(split.pairs) == 40 - uses_missing - 1 and split.info["pairs_listed"] == 40
    assert not any("Bo_Chen_0003" in k or ".." in k for k in split.keys)

    root = write_line_pairs(tmp_path / "calfw", "calfw")
    lines = two_line_pairs("calfw")
    lines[-2:] = ["../outside.jpg 0", "Ann_Lee_0001.jpg 0"]
    (root / "pairs_CALFW.txt").write_text("\n".join(lines) + "\n")
    write_square(root / "outside.jpg", (0, 0, 0), seed=0)
    assert read_calfw(root).skipped_by_reason == {OUTSIDE_ROOT: 1}


def test_no_images_at_all_says_where_it_looked(tmp_path):
    write_lfw(tmp_path)
    for path in (tmp_path / "lfw").rglob("*.jpg"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"none of the 40 listed pairs has both images under .*lfw"):
        read_lfw(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"CALFW pairs file: none of .*pairs_CALFW.txt"):
        read_calfw(tmp_path)


def _replace(lines: list[str], number: int, text: str | None) -> list[str]:
    """The lines with line `number` (1-based) replaced by `text`, or dropped when text is None."""
    out = list(lines)
    if text is None:
        del out[number - 1]
    else:
        out[number - 1] = text
    return out


LFW_LINES = lfw_lines(listed_pairs())


@pytest.mark.parametrize(
    ("lines", "line", "says"),
    [
        (_replace(LFW_LINES, 1, "10"), 1, r"read '10'; expected '<sets>\\t<pairs per set>'"),
        (_replace(LFW_LINES, 2, "Ann_Lee\t1\tBo_Chen\t2"), 2, r"4 fields .* \(matched pair of set 1\)"),
        (_replace(LFW_LINES, 4, "Ann_Lee\t1\t2"), 4, r"3 fields .* \(mismatched pair of set 1\)"),
        (_replace(LFW_LINES, 3, "Bo_Chen\ttwo\t3"), 3, r"'two' is not a whole number"),
        (
            _replace(LFW_LINES, 41, None),
            None,
            r"39 pair lines; expected 40 as line 1 says \(10 sets of 2 matched \+ 2 mismatched\)",
        ),
    ],
    ids=["header", "matched", "mismatched", "number", "truncated"],
)
def test_a_malformed_lfw_pairs_file_fails_naming_file_and_line(tmp_path, lines, line, says):
    write_lfw(tmp_path, lines=lines)
    where = re.escape(str(tmp_path / "pairs.txt")) + (f", line {line}: " if line else ": ")
    with pytest.raises(MalformedFileError, match=where + ".*" + says):
        read_lfw(tmp_path)


CALFW_LINES = two_line_pairs("calfw")
SAME_FIRST = two_line_pairs("calfw", "same pairs first")


@pytest.mark.parametrize(
    ("lines", "line", "says"),
    [
        (_replace(CALFW_LINES, 3, "Ann_Lee_0001.jpg"), 3, r"1 fields .* expected '<image file> <label>'"),
        (_replace(CALFW_LINES, 4, "Ann_Lee_0001.jpg yes"), 4, r"'yes' is not a whole number"),
        (_replace(CALFW_LINES, 80, None), 79, r"the last pair has one line"),
        (_replace(CALFW_LINES, 2, "Ann_Lee_0002.jpg 0"), 2, r"label 0 and line 1's label 1 disagree"),
        (CALFW_LINES[:-2], None, r"20 same and 19 different pairs; expected 10 folds"),
        (_replace(_replace(SAME_FIRST, 1, "Ann_Lee_0001.jpg 2"), 2, "Ann_Lee_0002.jpg 2"), 1, r"labelled 2"),
    ],
    ids=["fields", "label", "odd", "disagree", "folds", "fold-label"],
)
def test_a_malformed_calfw_pairs_file_fails_naming_file_and_line(tmp_path, lines, line, says):
    write_line_pairs(tmp_path, "calfw", lines)
    where = re.escape(str(tmp_path / "pairs_CALFW.txt")) + (f", line {line}: " if line else ": ")
    with pytest.raises(MalformedFileError, match=where + ".*" + says):
        read_calfw(tmp_path)


# -- protocol ----------------------------------------------------------------------------------


def reference_kfold(scores: np.ndarray, same: np.ndarray) -> tuple[list[float], list[float]]:
    """Thresholds and held-out accuracies by KFold(10) (contiguous, unshuffled) and a plain search:
    every midpoint between distinct training scores, one below and one above them all; the first
    (lowest) best one; "same" when the score is above it."""
    thresholds, accuracies = [], []
    for train, test in KFold(n_splits=10).split(scores):
        s = np.unique(scores[train])
        candidates = [s[0] - 1.0, *((s[1:] + s[:-1]) / 2), s[-1] + 1.0]
        train_accuracy = [np.mean((scores[train] > t) == same[train]) for t in candidates]
        t = candidates[int(np.argmax(train_accuracy))]
        thresholds.append(float(t))
        accuracies.append(float(np.mean((scores[test] > t) == same[test])))
    return thresholds, accuracies


def fold_after_fold(per_fold_same: int, per_fold_different: int) -> tuple[np.ndarray, np.ndarray]:
    same = np.tile(np.r_[np.ones(per_fold_same, bool), np.zeros(per_fold_different, bool)], 10)
    return same, np.repeat(np.arange(10), per_fold_same + per_fold_different)


def test_verification_metrics_equal_kfold_and_sklearn_on_the_same_scores():
    rng = np.random.default_rng(0)
    same, fold = fold_after_fold(100, 100)
    # rounded to two decimals: many tied scores, within a fold and across the same/different line
    scores = np.round(np.clip(np.where(same, 0.45, 0.15) + rng.normal(0, 0.2, len(same)), -1, 1), 2)
    metrics = verification_metrics(scores, same, fold)
    thresholds, accuracies = reference_kfold(scores, same)
    assert [f["threshold"] for f in metrics["folds"]] == pytest.approx(thresholds)
    assert [f["accuracy"] for f in metrics["folds"]] == pytest.approx(accuracies)
    assert metrics["summary"]["accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert metrics["summary"]["accuracy_std"] == pytest.approx(np.std(accuracies))
    assert 0.6 < metrics["summary"]["accuracy_mean"] < 0.95  # neither trivial nor chance
    assert metrics["summary"]["roc_auc"] == pytest.approx(roc_auc_score(same, scores))
    far, tar, _ = roc_curve(same, scores)
    assert metrics["roc"]["far"] == pytest.approx(far) and metrics["roc"]["tar"] == pytest.approx(tar)
    for name, target in (("TAR@FAR=1e-2", 1e-2), ("TAR@FAR=1e-3", 1e-3)):  # 1,000 different pairs
        assert metrics["summary"][name] == pytest.approx(tar[far <= target].max())
    assert metrics["tar_at_far"]["TAR@FAR=1e-4"] is None and "TAR@FAR=1e-4" not in metrics["summary"]
    assert metrics["notes"] == [
        "TAR@FAR=1e-4 not reported: it needs at least 10,000 different-person pairs, there are 1,000"
    ]


def test_the_threshold_search_at_its_edges():
    scores = np.array([0.2, 0.2, 0.2, 0.2])
    assert best_threshold(scores, np.array([True, True, False, True])) == (pytest.approx(-0.8), 0.75)
    assert best_threshold(scores, np.array([False, False, True, False])) == (pytest.approx(1.2), 0.75)
    separable = np.array([0.1, 0.3, 0.5, 0.9])
    assert best_threshold(separable, np.array([False, False, True, True])) == (pytest.approx(0.4), 1.0)
    with pytest.raises(ValueError, match="all same"):
        verification_metrics(separable, np.ones(4, bool), np.arange(4))
    with pytest.raises(
        ValueError, match="needs pairs in at least two folds; these 4 pairs are all in fold 3"
    ):
        verification_metrics(separable, np.array([False, False, True, True]), np.full(4, 2))


@torch.no_grad()
def test_the_flip_test_sums_an_image_and_its_mirror_before_normalising(tmp_path, tiny_model):
    paths = []
    for i, colour in enumerate(PEOPLE.values()):
        path = tmp_path / f"{i}.png"
        pixels = np.zeros((20, 20, 3), np.uint8)
        pixels[:, : 4 + 2 * i] = colour  # a band on the left: the mirror is another picture
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    flipped, kept = extract_image_features(tiny_model, ImageFiles(tuple(paths)), batch_size=4, flip=True)
    plain, _ = extract_image_features(tiny_model, ImageFiles(tuple(paths)), batch_size=4)
    assert kept == list(range(6))
    for i, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        own = tiny_model.encode_image(tiny_model.preprocess(image)[None])
        mirror = tiny_model.encode_image(tiny_model.preprocess(ImageOps.mirror(image))[None])
        assert flipped[i] == pytest.approx(F.normalize(own + mirror, dim=-1)[0], abs=1e-5)
        assert plain[i] == pytest.approx(F.normalize(own, dim=-1)[0], abs=1e-5)
        assert not torch.allclose(flipped[i], plain[i], atol=1e-3)
    # cached apart: the flip test never reads the plain features, nor the other way round
    split = read_lfw(write_lfw(tmp_path / "lfw"))
    cache = FeatureCache(tmp_path / "cache")
    a = split_features(tiny_model, split, "tiny", cache, progress=False, flip=True)
    b = split_features(tiny_model, split, "tiny", cache, progress=False)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert not torch.allclose(a.features, b.features)


# -- eval/verification.py ------------------------------------------------------------------------


def test_eval_verification_on_lfw_end_to_end(tmp_path, trained_demo):
    root = write_lfw(tmp_path / "lfwbench")
    cfg = compose_eval(
        "eval_verification", tmp_path, *eval_overrides(tmp_path, trained_demo.ckpt, "lfw", root)
    )
    metrics = run_verification(cfg)
    out = tmp_path / "out"
    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["protocol"] == written["task"] == "verification" and written["benchmark"] == "lfw"
    assert written["n_pairs"] == written["n_test"] == 40 and written["pairs_listed"] == 40
    assert written["flip_test"] is True and written["split_info"]["test"]["image_folder"] == "lfw"
    assert len(written["folds"]) == 10 and written["skipped"] == {"test": {}}
    assert (out / "roc.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| fold | threshold | accuracy | pairs |" in report and "![roc](roc.png)" in report

    assert_figures_by_hand(written, trained_demo.ckpt, read_lfw(root))


def assert_figures_by_hand(written: dict, ckpt, split) -> None:
    """The run's figures equal those of the model's own embeddings (image + its mirror), scored by
    sklearn's 10-fold split and ROC AUC."""
    import flip

    model = flip.load(ckpt)
    with torch.no_grad():
        embeddings = []
        for path in split.images.paths:
            image = Image.open(path).convert("RGB")
            both = [model.preprocess(im)[None] for im in (image, ImageOps.mirror(image))]
            embeddings.append(F.normalize(sum(model.encode_image(x) for x in both), dim=-1)[0])
    embeddings = torch.stack(embeddings)
    i, j = split.pairs.index.T
    scores = (embeddings[i] * embeddings[j]).sum(-1).numpy().astype(np.float64)
    assert (
        list(KFold(n_splits=10).split(scores))[3][1].tolist()
        == np.flatnonzero(split.pairs.fold == 3).tolist()
    )
    _, accuracies = reference_kfold(scores, split.pairs.same)
    assert [f["accuracy"] for f in written["folds"]] == pytest.approx(accuracies)
    assert written["summary"]["accuracy_mean"] == pytest.approx(np.mean(accuracies), abs=1e-6)
    assert written["summary"]["roc_auc"] == pytest.approx(roc_auc_score(split.pairs.same, scores), abs=1e-4)


@pytest.mark.parametrize("benchmark", ["calfw", "cplfw"])
def test_eval_verification_on_calfw_and_cplfw_end_to_end(tmp_path, trained_demo, benchmark):
    root = write_line_pairs(tmp_path / benchmark, benchmark)
    cfg = compose_eval(
        "eval_verification", tmp_path, *eval_overrides(tmp_path, trained_demo.ckpt, benchmark, root)
    )
    run_verification(cfg)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["benchmark"] == benchmark and written["n_pairs"] == written["pairs_listed"] == 40
    assert len(written["folds"]) == 10 and written["skipped"] == {"test": {}}
    assert (tmp_path / "out" / "roc.png").stat().st_size > 1000
    assert_figures_by_hand(written, trained_demo.ckpt, READERS[benchmark](root))


def test_eval_verification_without_the_flip_test_and_on_a_benchmark_without_pairs(
    tmp_path, tiny_ckpt, folder_benchmark
):
    root = write_line_pairs(tmp_path / "cplfw", "cplfw")
    overrides = eval_overrides(tmp_path, tiny_ckpt, "cplfw", root)
    metrics = run_verification(
        compose_eval("eval_verification", tmp_path, *overrides, "protocols.verification.flip_test=false")
    )
    assert metrics["flip_test"] is False and metrics["benchmark"] == "cplfw" and metrics["n_pairs"] == 40
    with pytest.raises(ValueError, match=r"folder/test has no pairs: .*benchmark=lfw, calfw or cplfw"):
        run_verification(
            compose_eval(
                "eval_verification",
                tmp_path,
                *eval_overrides(tmp_path, tiny_ckpt, "folder", folder_benchmark),
            )
        )
