"""UTKFace (aligned and cropped faces): age, gender and race in each file's name.

    ROOT/UTKFace/<age>_<gender>_<race>_<yyyymmddHHMMSSFFF>.jpg.chip.jpg   (or ROOT holding the files)

age 0..116; gender 0 male, 1 female; race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others.
The published folder has names that break the pattern (a missing race field, a space before
`.jpg`, a missing dot in `...357jpg.chip.jpg`): they are skipped and counted by reason, never
given a guessed label. UTKFace has no official split, so the reader makes one from a seed:
the well-formed names, sorted, are permuted by the seed and cut by the fractions; the seed,
the fractions, the counts and a digest of the name list land in metrics.json (`split_info`),
so a result says which split it was measured on and another copy of the dataset can check it
holds the same files.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from flip.benchmarks.base import OUTSIDE_ROOT, ImageFiles, LabelledSplit, check_split, inside
from flip.benchmarks.fairface import AGE_GROUPS, GENDERS, age_group_of

UTKFACE_RACES = ["White", "Black", "Asian", "Indian", "Others"]
UTKFACE_SPLITS = ("train", "val", "test")
MAX_AGE = 116
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
WELL_FORMED = re.compile(r"(\d+)_(\d+)_(\d+)_(\d+)\.jpg\.chip\.jpg")
# how the published folder's malformed names break the pattern, checked in this order
MALFORMED = (
    ("space_in_name", re.compile(r".*\s.*")),
    ("missing_dot", re.compile(r"\d+_\d+_\d+_\d+jpg\.chip\.jpg")),
    ("race_missing", re.compile(r"\d+_\d+_\d+\.jpg\.chip\.jpg")),  # age_gender_date: no race
)


def parse_utkface_name(name: str) -> tuple[int, int, int] | str:
    """(age, gender, race) of a well-formed file name, else the reason it is skipped."""
    match = WELL_FORMED.fullmatch(name)
    if match is None:
        return next((reason for reason, pattern in MALFORMED if pattern.fullmatch(name)), "unrecognised_name")
    age, gender, race = (int(match.group(i)) for i in (1, 2, 3))
    if age > MAX_AGE:
        return "age_out_of_range"
    if gender > 1:
        return "gender_out_of_range"
    if race >= len(UTKFACE_RACES):
        return "race_out_of_range"
    return age, gender, race


def _fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    given = {str(k): float(v) for k, v in dict(fractions).items()}
    if set(given) != set(UTKFACE_SPLITS) or any(v < 0 for v in given.values()):
        raise ValueError(f"utkface fractions {given}: give train, val and test, each >= 0")
    if abs(sum(given.values()) - 1.0) > 1e-6:
        raise ValueError(f"utkface fractions {given} sum to {sum(given.values()):g}; they must sum to 1")
    return {s: given[s] for s in UTKFACE_SPLITS}


def seeded_split(names: list[str], fractions: Mapping[str, float], seed: int) -> dict[str, list[str]]:
    """Sorted names, permuted by `seed`, cut into train/val/test by `fractions` (each split's
    names in sorted order): the same files, seed and fractions always give the same split."""
    names = sorted(names)
    order = np.random.default_rng(seed).permutation(len(names))
    n_train = round(fractions["train"] * len(names))
    n_val = round(fractions["val"] * len(names))
    cuts = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    return {split: [names[i] for i in sorted(index)] for split, index in cuts.items()}


def image_folder(root: Path) -> Path:
    folder = root / "UTKFace"
    if folder.is_dir():
        return folder
    if root.is_dir():
        return root
    raise FileNotFoundError(f"UTKFace: {str(root)!r} is not a folder; check benchmark.root")


def read_utkface(
    root: str | os.PathLike,
    split: str,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> LabelledSplit:
    """The `split` ("train", "val", "test") of UTKFace's seeded split (see the module doc)."""
    check_split(split, UTKFACE_SPLITS, "utkface")
    fractions = _fractions(fractions)
    folder = image_folder(Path(root))
    labels: dict[str, tuple[int, int, int]] = {}
    skipped: Counter[str] = Counter()
    for entry in os.scandir(folder):
        if not entry.is_file() or not entry.name.lower().endswith(".jpg"):
            continue  # not an image of the dataset (a README, .DS_Store)
        parsed = parse_utkface_name(entry.name)
        if inside(folder, entry.name) is None:  # a symlink out of the folder: never opened
            skipped[OUTSIDE_ROOT] += 1
        elif isinstance(parsed, str):
            skipped[parsed] += 1
        else:
            labels[entry.name] = parsed
    if not labels:
        raise FileNotFoundError(
            f"UTKFace: no <age>_<gender>_<race>_<date>.jpg.chip.jpg files in {str(folder)!r}"
            + (f" (skipped: {dict(skipped)})" if skipped else "")
        )
    splits = seeded_split(list(labels), fractions, int(seed))
    names = splits[split]
    ages = np.asarray([labels[n][0] for n in names], dtype=np.float64)
    digest = hashlib.sha256("\n".join(sorted(labels)).encode()).hexdigest()[:16]
    return LabelledSplit(
        benchmark="utkface",
        split=split,
        task="multitask",
        label_names=[],
        targets=np.zeros((len(names), 0), dtype=np.int64),
        images=ImageFiles(tuple(str(folder / n) for n in names)),
        keys=names,
        questions={
            "gender": (list(GENDERS), np.asarray([labels[n][1] for n in names], dtype=np.int64)),
            "race": (list(UTKFACE_RACES), np.asarray([labels[n][2] for n in names], dtype=np.int64)),
            "age_group": (list(AGE_GROUPS), age_group_of(ages)),
        },
        values={"age": ages},
        info={
            "split": "seeded",
            "seed": int(seed),
            "fractions": fractions,
            "counts": {s: len(v) for s, v in splits.items()},
            "files": len(labels),
            "names_sha256": digest,
        },
        skipped_by_reason=dict(sorted(skipped.items())),
    )
