"""Face verification benchmarks (LFW, CALFW, CPLFW): pairs of images, same person or not, in folds.

    lfw/    pairs.txt                         `10\t300`, then per set 300 matched lines
                                              `Name\tn1\tn2` and 300 mismatched lines
                                              `Name1\tn1\tName2\tn2`
            lfw/<Name>/<Name>_<NNNN>.jpg      (or lfw-deepfunneled/, the same tree; a doubly
                                              nested lfw/lfw/ as some archives unpack is found too)
    calfw/  pairs_CALFW.txt                   two lines per pair, `<file> <label>`; label 0:
            aligned images/<file>             different people, anything else: the same person
    cplfw/  pairs_CPLFW.txt                   (the same, CPLFW's files)
            aligned images/<file>

The pairs file decides everything the protocol needs: which pairs, which are one person, and
the folds. LFW's folds are its sets. CALFW and CPLFW list 6,000 pairs for 10 folds of 300 same
+ 300 different, and releases differ in how they order them (fold after fold, or every same pair
before every different one, the same pairs labelled with their fold 1..10): fold k is the k-th
tenth of the same pairs and the k-th tenth of the different pairs, in file order, which reads
both orders alike, and same-pair labels that look like fold numbers must agree with it.

A malformed line fails naming the file, the line and what was expected, since a misread pair
would silently move the threshold. A pair whose image file is missing is left out and counted
(`pair_image_missing`), a pair naming a path out of the image folder too (`path_outside_root`),
never opened. AgeDB-30 is not read: it ships as insightface's `agedb_30.bin`, a Python pickle,
and unpickling a downloaded file can run code.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flip.benchmarks.base import (
    OUTSIDE_ROOT,
    ImageFiles,
    LabelledSplit,
    MalformedFileError,
    Pairs,
    check_split,
    find_first,
    inside,
)

VERIFICATION_SPLITS = ("test",)  # no training: the pairs are all there is
MISSING_IMAGE = "pair_image_missing"  # skip reason: a pair whose image file does not exist
FOLDS = 10
LFW_IMAGE_DIRS = ("lfw", "lfw-deepfunneled")
# the released archives unpack to `aligned images/` (with a space); renamed copies are common
ALIGNED_IMAGE_DIRS = ("aligned images", "aligned_images", "aligned", "images")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListedPair:
    """One pair as its file lists it: two image names relative to the image folder."""

    first: str
    second: str
    same: bool
    fold: int
    line: int


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, whitespace-split fields) of the non-blank lines; BOM and CRLF tolerated."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MalformedFileError(
            path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})", "text"
        ) from exc
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _number(value: str, path: Path, line: int, expected: str) -> int:
    if not value.isdigit():
        raise MalformedFileError(path, line, f"{value!r} is not a whole number", expected)
    return int(value)


def lfw_image_name(name: str, number: int) -> str:
    """LFW's file of a person's n-th image: `Name/Name_000n.jpg`."""
    return f"{name}/{name}_{number:04d}.jpg"


def parse_lfw_pairs(path: str | os.PathLike) -> list[ListedPair]:
    """The pairs of LFW's `pairs.txt`, each with its set (0-based) as its fold."""
    path = Path(path)
    lines = _lines(path)
    header = "'<sets>\\t<pairs per set>', e.g. '10\\t300'"
    if not lines:
        raise MalformedFileError(path, None, "the file is empty", header)
    number, fields = lines[0]
    if len(fields) != 2:
        raise MalformedFileError(path, number, f"read {' '.join(fields)!r}", header)
    sets, per_set = (_number(f, path, number, header) for f in fields)
    if sets < 2 or per_set < 1:
        raise MalformedFileError(path, number, f"{sets} sets of {per_set} pairs", "at least 2 sets of 1 pair")
    body = lines[1:]
    if len(body) != 2 * sets * per_set:
        where = body[-1][0] if len(body) > 2 * sets * per_set else None
        raise MalformedFileError(
            path,
            where,
            f"{len(body)} pair lines",
            f"{2 * sets * per_set} as line 1 says ({sets} sets of {per_set} matched + {per_set} mismatched)",
        )
    pairs = []
    for index, (number, fields) in enumerate(body):
        fold, same = index // (2 * per_set), index % (2 * per_set) < per_set
        where = f"{'matched' if same else 'mismatched'} pair of set {fold + 1}"
        expected = f"'Name\\tn1\\tn2' ({where})" if same else f"'Name1\\tn1\\tName2\\tn2' ({where})"
        if len(fields) != (3 if same else 4):
            raise MalformedFileError(path, number, f"{len(fields)} fields in {' '.join(fields)!r}", expected)
        if same:
            first = lfw_image_name(fields[0], _number(fields[1], path, number, expected))
            second = lfw_image_name(fields[0], _number(fields[2], path, number, expected))
        else:
            first = lfw_image_name(fields[0], _number(fields[1], path, number, expected))
            second = lfw_image_name(fields[2], _number(fields[3], path, number, expected))
        pairs.append(ListedPair(first, second, same, fold, number))
    return pairs


def parse_line_pairs(path: str | os.PathLike, folds: int = FOLDS) -> tuple[list[ListedPair], str]:
    """The pairs of CALFW's / CPLFW's pairs file (two `<file> <label>` lines per pair), folded
    as the module doc says; and the order the file lists them in, in words."""
    path = Path(path)
    expected = "'<image file> <label>' (label 0: different people, otherwise the same person)"
    lines = _lines(path)
    if not lines:
        raise MalformedFileError(path, None, "the file is empty", expected)
    for number, fields in lines:
        if len(fields) != 2:
            raise MalformedFileError(path, number, f"{len(fields)} fields in {' '.join(fields)!r}", expected)
        _number(fields[1], path, number, expected)
    if len(lines) % 2:
        raise MalformedFileError(
            path, lines[-1][0], "the last pair has one line", "two lines per pair, an even number of lines"
        )
    listed = []  # (first, second, same, label, line of the second)
    for (n1, (a, label_a)), (n2, (b, label_b)) in zip(lines[::2], lines[1::2], strict=True):
        if (int(label_a) != 0) != (int(label_b) != 0):
            raise MalformedFileError(
                path,
                n2,
                f"this line's label {label_b} and line {n1}'s label {label_a} disagree on same / different",
                "both lines of a pair labelled 0, or both non-zero",
            )
        listed.append((a, b, int(label_a) != 0, int(label_a), n1))
    same = np.array([s for _, _, s, _, _ in listed])
    counts = {"same": int(same.sum()), "different": int((~same).sum())}
    if any(c == 0 or c % folds for c in counts.values()):
        raise MalformedFileError(
            path,
            None,
            f"{counts['same']} same and {counts['different']} different pairs",
            f"{folds} folds of equal parts of each (6,000 pairs: 3,000 and 3,000)",
        )
    fold = np.empty(len(listed), dtype=np.int64)
    for kind in (True, False):
        members = np.flatnonzero(same == kind)
        fold[members] = np.arange(len(members)) // (len(members) // folds)
    labels = {label for _, _, s, label, _ in listed if s}
    if labels == set(range(1, folds + 1)):  # same pairs labelled with their fold: check it
        for (_, _, s, label, number), k in zip(listed, fold, strict=True):
            if s and label != k + 1:
                raise MalformedFileError(
                    path,
                    number,
                    f"a same pair labelled {label} is the same pair of fold {k + 1} by file order",
                    "the same pairs of fold k (in file order) labelled k",
                )
    interleaved = all((fold[i] == i // (len(fold) // folds)) for i in range(len(fold)))
    order = "fold after fold" if interleaved else "same pairs first, folds by order within each kind"
    pairs = [ListedPair(a, b, s, int(k), n) for (a, b, s, _, n), k in zip(listed, fold, strict=True)]
    return pairs, order


def verification_split(
    benchmark: str, pairs: Sequence[ListedPair], image_dir: Path, info: dict
) -> LabelledSplit:
    """The "test" split of listed pairs over `image_dir`: each image loaded once, pairs whose
    images are missing or lead out of the folder left out and counted by reason."""
    found: dict[str, Path | None] = {}  # name -> path, None outside the folder; checked once each

    def locate(name: str) -> Path | None:
        if name not in found:
            found[name] = inside(image_dir, name)
        return found[name]

    exists: dict[str, bool] = {}
    index: dict[str, int] = {}
    kept, skipped, example = [], Counter(), {}
    for pair in pairs:
        paths = [locate(pair.first), locate(pair.second)]
        if any(p is None for p in paths):
            skipped[OUTSIDE_ROOT] += 1
            example.setdefault(OUTSIDE_ROOT, pair)
            continue
        for p in paths:
            if str(p) not in exists:
                exists[str(p)] = p.is_file()
        if not all(exists[str(p)] for p in paths):
            skipped[MISSING_IMAGE] += 1
            example.setdefault(MISSING_IMAGE, pair)
            continue
        kept.append(
            (index.setdefault(pair.first, len(index)), index.setdefault(pair.second, len(index)), pair)
        )
    for reason, pair in example.items():
        log.warning(
            "%s: left out %d pair(s) (%s), e.g. line %d: %s / %s under %s",
            benchmark,
            skipped[reason],
            reason,
            pair.line,
            pair.first,
            pair.second,
            image_dir,
        )
    if not kept:
        first = pairs[0] if pairs else None
        raise FileNotFoundError(
            f"{benchmark}: none of the {len(pairs)} listed pairs has both images under {str(image_dir)!r}"
            + (f", e.g. {first.first!r}" if first else "")
            + "; check benchmark.root"
        )
    names = list(index)
    return LabelledSplit(
        benchmark=benchmark,
        split="test",
        task="verification",
        label_names=[],
        targets=np.zeros((len(names), 0), dtype=np.int8),
        images=ImageFiles(tuple(str(image_dir / n) for n in names)),
        keys=names,
        pairs=Pairs(
            index=np.asarray([[i, j] for i, j, _ in kept], dtype=np.int64).reshape(len(kept), 2),
            same=np.asarray([p.same for _, _, p in kept], dtype=bool),
            fold=np.asarray([p.fold for _, _, p in kept], dtype=np.int64),
        ),
        info={**info, "pairs_listed": len(pairs), "folds": len({p.fold for p in pairs})},
        skipped_by_reason=dict(skipped),
    )


def _lfw_images(root: Path, images: str) -> Path:
    names = LFW_IMAGE_DIRS if images == "auto" else (images,)
    if images not in ("auto", *LFW_IMAGE_DIRS):
        raise ValueError(f"lfw images={images!r}; accepted: auto, {', '.join(LFW_IMAGE_DIRS)}")
    folder = find_first(root, names, "LFW image folder")
    nested = folder / folder.name  # archives that unpack to lfw-deepfunneled/lfw-deepfunneled/
    return nested if nested.is_dir() else folder


def read_lfw(root: str | os.PathLike, split: str = "test", images: str = "auto") -> LabelledSplit:
    """LFW's 6,000 pairs (`pairs.txt`, View 2) over `lfw/` or `lfw-deepfunneled/` (`images`:
    auto takes the first that exists, in that order; `info` says which was read)."""
    check_split(split, VERIFICATION_SPLITS, "lfw")
    root = Path(root)
    pairs_file = find_first(root, ("pairs.txt",), "LFW pairs file")
    image_dir = _lfw_images(root, images)
    info = {
        "layout": "lfw",
        "pairs_file": str(pairs_file),
        "image_folder": str(image_dir.relative_to(root)),
        "fold_order": "sets of pairs.txt",
    }
    return verification_split("lfw", parse_lfw_pairs(pairs_file), image_dir, info)


def _read_line_pairs(benchmark: str, root: str | os.PathLike, split: str, pairs_name: str) -> LabelledSplit:
    check_split(split, VERIFICATION_SPLITS, benchmark)
    root = Path(root)
    pairs_file = find_first(root, (pairs_name, f"txts/{pairs_name}"), f"{benchmark.upper()} pairs file")
    image_dir = find_first(root, ALIGNED_IMAGE_DIRS, f"{benchmark.upper()} image folder")
    pairs, order = parse_line_pairs(pairs_file)
    info = {
        "layout": benchmark,
        "pairs_file": str(pairs_file),
        "image_folder": str(image_dir.relative_to(root)),
        "fold_order": order,
    }
    return verification_split(benchmark, pairs, image_dir, info)


def read_calfw(root: str | os.PathLike, split: str = "test") -> LabelledSplit:
    """CALFW (cross-age LFW): `pairs_CALFW.txt` over `aligned images/`."""
    return _read_line_pairs("calfw", root, split, "pairs_CALFW.txt")


def read_cplfw(root: str | os.PathLike, split: str = "test") -> LabelledSplit:
    """CPLFW (cross-pose LFW): `pairs_CPLFW.txt` over `aligned images/`."""
    return _read_line_pairs("cplfw", root, split, "pairs_CPLFW.txt")
