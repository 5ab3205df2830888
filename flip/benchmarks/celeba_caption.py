"""MM-CelebA-HQ (CelebA-Caption): CelebA-HQ faces with ten captions each, for text-face retrieval.

The published layout, under `benchmark.root`:

    ROOT/celeba-caption/<N>.txt     one caption per line (ten per image); or celeba_caption/
                                    (what the dataset's create_caption.py writes) or text/
    ROOT/CelebA-HQ-img/<N>.jpg      the CelebA-HQ images as CelebAMask-HQ ships them; or
                                    CelebAMask-HQ/CelebA-HQ-img/, image/ or images/
    ROOT/test/filenames.txt         the split's image ids, one per line (`27000` or `27000.jpg`);
                                    or ROOT/test.txt (likewise train)

The split lists are published as Python pickles (`test/filenames.pickle`). They are never read
here: loading a pickle runs whatever code it holds. A user who trusts the file turns it into
the text list once, with the command `pickle_to_text` writes (docs/evaluation.md shows it).

A list entry without a caption file, a caption file without captions and a malformed id fail,
naming the file and line; a listed image that is not on disk is left out and counted.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from flip.benchmarks.base import ImageFiles, LabelledSplit, MalformedFileError, check_split

SPLITS = ("train", "test")
CAPTION_DIRS = ("celeba-caption", "celeba_caption", "text")
IMAGE_DIRS = ("CelebA-HQ-img", "CelebAMask-HQ/CelebA-HQ-img", "image", "images")
IMAGE_SUFFIXES = (".jpg", ".png")
MISSING_IMAGE = "missing_image"  # skip reason: a listed id with no image file
_ID = re.compile(r"^(\d+)(?:\.(?:jpg|png))?$")


def pickle_to_text(pickle_file: str, text_file: str) -> str:
    """The shell command a user runs, on a pickle they trust, to write the text list read here."""
    return (
        "python -c \"import pickle, sys; print(*pickle.load(open(sys.argv[1], 'rb'), encoding='latin1'), "
        f"sep='\\n')\" {pickle_file} > {text_file}"
    )


PICKLE_TO_TEXT = pickle_to_text("test/filenames.pickle", "test/filenames.txt")


def _list_candidates(split: str) -> tuple[str, ...]:
    return (f"{split}/filenames.txt", f"{split}.txt")


def _find_dir(root: Path, candidates: tuple[str, ...], what: str) -> Path:
    found = next((root / d for d in candidates if (root / d).is_dir()), None)
    if found is None:
        raise FileNotFoundError(
            f"MM-CelebA-HQ {what}: none of {[str(root / d) for d in candidates]} is a folder; "
            f"check benchmark.root={str(root)!r}"
        )
    return found


def _find_list(root: Path, split: str) -> Path:
    for candidate in _list_candidates(split):
        if (root / candidate).is_file():
            return root / candidate
    pickles = [root / split / "filenames.pickle", root / f"{split}.pickle"]
    found = next((p for p in pickles if p.is_file()), None)
    if found is not None:
        pickle_file = found.relative_to(root).as_posix()
        raise FileNotFoundError(
            f"MM-CelebA-HQ {split} list: {found} is a Python pickle, which FLIP never loads "
            "(unpickling a file can run any code it holds). If you trust the file, write the plain "
            f"text list of ids (one per line) from it yourself; in {root}: "
            + pickle_to_text(pickle_file, _list_candidates(split)[0 if "/" in pickle_file else 1])
        )
    raise FileNotFoundError(
        f"MM-CelebA-HQ {split} list: none of {[str(root / c) for c in _list_candidates(split)]} exists; "
        "give the split's image ids, one per line; check benchmark.root"
    )


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise MalformedFileError(path, line, f"not UTF-8 text ({exc.reason})", "plain UTF-8 text") from exc


def read_id_list(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, image id) of a split list: one id per line (`27000` or `27000.jpg`)."""
    path = Path(path)
    ids: list[tuple[int, str]] = []
    first: dict[str, int] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        text = line.strip()
        if not text:
            continue
        match = _ID.match(text)
        if match is None:
            raise MalformedFileError(
                path, number, f"{text[:60]!r} is not an image id", "one id per line, e.g. 27000 or 27000.jpg"
            )
        image_id = str(int(match.group(1)))
        if image_id in first:
            raise MalformedFileError(
                path,
                number,
                f"id {image_id} is listed twice (first on line {first[image_id]})",
                "each id once",
            )
        first[image_id] = number
        ids.append((number, image_id))
    if not ids:
        raise MalformedFileError(path, None, "the list holds no ids", "one image id per line")
    return ids


def read_captions(path: str | os.PathLike) -> list[str]:
    """The captions of one image: its caption file's non-blank lines."""
    path = Path(path)
    captions = [line.strip() for line in _read_lines(path) if line.strip()]
    if not captions:
        raise MalformedFileError(path, None, "the caption file holds no captions", "one caption per line")
    return captions


def read_celeba_caption(root: str | os.PathLike, split: str) -> LabelledSplit:
    """A split of MM-CelebA-HQ: its images, each with its list of captions (no labels)."""
    check_split(split, SPLITS, "celeba_caption")
    root = Path(root)
    caption_dir = _find_dir(root, CAPTION_DIRS, "caption folder")
    image_dir = _find_dir(root, IMAGE_DIRS, "image folder")
    list_file = _find_list(root, split)
    paths, keys, captions = [], [], []
    skipped: Counter[str] = Counter()
    for number, image_id in read_id_list(list_file):
        caption_file = caption_dir / f"{image_id}.txt"
        if not caption_file.is_file():
            raise MalformedFileError(
                list_file,
                number,
                f"id {image_id} has no caption file {caption_file}",
                "ids of captioned images",
            )
        image = next((p for p in (image_dir / f"{image_id}{s}" for s in IMAGE_SUFFIXES) if p.is_file()), None)
        if image is None:
            skipped[MISSING_IMAGE] += 1
            continue
        paths.append(str(image))
        keys.append(image_id)
        captions.append(read_captions(caption_file))
    if not keys:
        raise FileNotFoundError(
            f"MM-CelebA-HQ {split}: none of the {sum(skipped.values())} images listed in {list_file} "
            f"is in {image_dir}"
        )
    per_image = [len(c) for c in captions]
    return LabelledSplit(
        benchmark="celeba_caption",
        split=split,
        task="multitask",  # no labels: the captions are what the split holds
        label_names=[],
        targets=np.zeros((len(keys), 0), dtype=np.int8),
        images=ImageFiles(tuple(paths)),
        keys=keys,
        captions=captions,
        info={
            "list": str(list_file.relative_to(root)),
            "caption_dir": str(caption_dir.relative_to(root)),
            "image_dir": str(image_dir.relative_to(root)),
            "captions": sum(per_image),
            "captions_per_image": {"min": min(per_image), "max": max(per_image)},
        },
        skipped_by_reason=dict(skipped),
    )
