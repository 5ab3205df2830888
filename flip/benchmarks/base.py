"""A labelled split of a face benchmark, whatever layout it was read from.

Every reader (CelebA, RAF-DB, FER2013, AffectNet, folders, CSVs, shards) turns its published
files into the same object: how to load image i, and the labels of image i. Evaluation code
then never needs to know where a benchmark came from, and a new layout needs only a reader.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from PIL import Image

from flip.data.shards import decode_image

if TYPE_CHECKING:
    from flip.benchmarks.dense import DenseLabels

TASKS = ("attributes", "classification", "multitask", "verification", "parsing", "landmarks")
OUTSIDE_ROOT = "path_outside_root"  # skip reason: a listed image name leads outside its folder


class MalformedFileError(ValueError):
    """A benchmark file that does not follow its published layout: names the file, line and expectation."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str, expected: str) -> None:
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {problem}; expected {expected}")
        self.path, self.line = str(path), line


class ImageSource(Protocol):
    """Loads image i as RGB; `describe(i)` names it in messages; `fingerprint()` keys feature caches;
    `size(i)` is its (width, height) without decoding it all (dense labels are placed by it)."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image: ...

    def size(self, index: int) -> tuple[int, int]: ...

    def describe(self, index: int) -> str: ...

    def subset(self, indices: Sequence[int]) -> ImageSource: ...

    def fingerprint(self) -> str: ...


def digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class ImageFiles:
    """Images on disk, one path each, optionally cropped to a box (x, y, width, height)."""

    paths: tuple[str, ...]
    boxes: tuple[tuple[int, int, int, int], ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB")
        if self.boxes is not None:
            x, y, w, h = self.boxes[index]
            image = image.crop((x, y, x + w, y + h))
        return image

    def size(self, index: int) -> tuple[int, int]:
        if self.boxes is not None:
            return self.boxes[index][2], self.boxes[index][3]
        with Image.open(self.paths[index]) as image:  # reads the header only
            return image.size

    def describe(self, index: int) -> str:
        return self.paths[index]

    def subset(self, indices: Sequence[int]) -> ImageFiles:
        return ImageFiles(
            tuple(self.paths[i] for i in indices),
            None if self.boxes is None else tuple(self.boxes[i] for i in indices),
        )

    def fingerprint(self) -> str:
        # path and size and mtime: a replaced file changes the key without reading every image
        stats = []
        for path in self.paths:
            try:
                st = os.stat(path)
                stats.append((path, st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((path, None, None))
        return digest("files", stats, self.boxes)


@dataclass(frozen=True)
class PixelArrays:
    """Images given as uint8 arrays, [N, H, W] grayscale or [N, H, W, 3] (FER2013's CSV pixels)."""

    pixels: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.pixels)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.pixels[index]).convert("RGB")

    def size(self, index: int) -> tuple[int, int]:
        return self.pixels.shape[2], self.pixels.shape[1]

    def describe(self, index: int) -> str:
        return self.names[index]

    def subset(self, indices: Sequence[int]) -> PixelArrays:
        indices = list(indices)
        return PixelArrays(self.pixels[indices], tuple(self.names[i] for i in indices))

    def fingerprint(self) -> str:
        return digest("pixels", np.ascontiguousarray(self.pixels).tobytes(), self.names)


@dataclass(frozen=True)
class EncodedImages:
    """Images held as encoded bytes (JPEG/PNG), e.g. read out of webdataset shards."""

    blobs: tuple[bytes, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.blobs)

    def load(self, index: int) -> Image.Image:
        return decode_image(self.blobs[index])

    def size(self, index: int) -> tuple[int, int]:
        with Image.open(io.BytesIO(self.blobs[index])) as image:  # reads the header only
            return image.size

    def describe(self, index: int) -> str:
        return self.names[index]

    def subset(self, indices: Sequence[int]) -> EncodedImages:
        return EncodedImages(tuple(self.blobs[i] for i in indices), tuple(self.names[i] for i in indices))

    def fingerprint(self) -> str:
        return digest("encoded", *self.blobs, self.names)


@dataclass(frozen=True)
class Pairs:
    """Verification pairs over a split's images: `index` [P, 2] image indices, `same` [P] bool
    (one person), `fold` [P] int (the published 10-fold protocol's folds, in file order)."""

    index: np.ndarray
    same: np.ndarray
    fold: np.ndarray

    def __post_init__(self) -> None:
        p = len(self.index)
        if self.index.shape != (p, 2) or self.same.shape != (p,) or self.fold.shape != (p,):
            raise ValueError(
                f"pairs disagree: index {self.index.shape}, same {self.same.shape}, fold {self.fold.shape}; "
                "expected [P, 2], [P] and [P]"
            )

    def __len__(self) -> int:
        return len(self.index)

    def restricted_to(self, images: np.ndarray) -> Pairs:
        """The pairs whose two images are both among `images` (old indices), renumbered to their
        positions in `images`: what is left when a split loses images (unreadable, subsampled)."""
        position = np.full(int(max(self.index.max(initial=-1), images.max(initial=-1))) + 1, -1, np.int64)
        position[images] = np.arange(len(images))
        mapped = position[self.index]
        keep = (mapped >= 0).all(axis=1)
        return Pairs(mapped[keep], self.same[keep], self.fold[keep])


@dataclass
class LabelledSplit:
    """Images and labels of one split.

    `task` says where the labels are:
    - "attributes": `targets` is [N, A] int8 (1 present, 0 absent, -1 unlabelled), A = `label_names`;
    - "classification": `targets` is [N] int64 class indices into `label_names`;
    - "multitask": no primary label (`targets` [N, 0], `label_names` []); the labels are the
      `questions` and `values` (UTKFace, FairFace: age, gender, race);
    - "verification": no per-image label (`targets` [N, 0]); `pairs` says which images show one person;
    - "parsing" / "landmarks": `targets` [N, 0]; `dense` holds each face's mask or points
      (flip.benchmarks.dense), `label_names` its classes or points.
    `questions` holds multi-class labels, beside the attributes or as the multitask's labels:
    name -> (classes, [N] indices, -1 unlabelled). `values` holds regression targets: name -> [N]
    float, NaN unlabelled (UTKFace age). `captions` enables retrieval: one caption per image, or a
    list of captions per image (MM-CelebA-HQ has ten). `info` records how the reader built the
    split (a seeded split's seed and fractions, the layout it read) and lands in metrics.json.
    """

    benchmark: str
    split: str
    task: Literal["attributes", "classification", "multitask", "verification", "parsing", "landmarks"]
    label_names: list[str]
    targets: np.ndarray
    images: ImageSource
    keys: list[str]
    captions: list[str] | list[list[str]] | None = None
    questions: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    pairs: Pairs | None = None
    dense: DenseLabels | None = None
    info: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0  # records a reader dropped; `skipped_by_reason` says why
    skipped_by_reason: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # one count per reason is what evaluation reports; a bare count is a reader's unusable records
        if self.skipped_by_reason:
            self.skipped = sum(self.skipped_by_reason.values())
        elif self.skipped:
            self.skipped_by_reason = {"unusable_record": self.skipped}
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {TASKS}")
        n = len(self.keys)
        expected = {"attributes": (n, len(self.label_names)), "classification": (n,)}.get(self.task, (n, 0))
        if self.targets.shape != expected or len(self.images) != n:
            raise ValueError(
                f"{self.benchmark}/{self.split}: targets {self.targets.shape}, {len(self.images)} images and "
                f"{n} keys disagree; expected targets of shape {expected}"
            )
        if self.captions is not None and len(self.captions) != n:
            raise ValueError(f"{self.benchmark}/{self.split}: {len(self.captions)} captions for {n} images")
        for name, labels in [*((q, y) for q, (_, y) in self.questions.items()), *self.values.items()]:
            if labels.shape != (n,):
                raise ValueError(
                    f"{self.benchmark}/{self.split}: label {name!r} has shape {labels.shape}, not ({n},)"
                )
        if (self.task == "verification") != (self.pairs is not None):
            raise ValueError(
                f"{self.benchmark}/{self.split}: pairs are given exactly when the task is verification"
            )
        if (self.task in ("parsing", "landmarks")) != (self.dense is not None) or (
            self.dense is not None and (self.dense.kind != self.task or len(self.dense) != n)
        ):
            raise ValueError(
                f"{self.benchmark}/{self.split}: dense labels of one kind per image are given exactly "
                f"when the task is parsing or landmarks (task {self.task})"
            )

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledSplit:
        """The same split restricted to `indices` (in that order); verification pairs lose the
        pairs whose images are gone."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            targets=self.targets[idx],
            images=self.images.subset(idx.tolist()),
            keys=[self.keys[i] for i in idx],
            captions=None if self.captions is None else [self.captions[i] for i in idx],
            questions={k: (c, y[idx]) for k, (c, y) in self.questions.items()},
            values={k: v[idx] for k, v in self.values.items()},
            pairs=None if self.pairs is None else self.pairs.restricted_to(idx),
            dense=None if self.dense is None else self.dense.subset(idx),
        )

    def sample(self, count: int | None, seed: int = 0) -> LabelledSplit:
        """A seeded random subset of `count` samples (all of them when None or larger), kept in order."""
        if count is None or count >= len(self):
            return self
        rng = np.random.default_rng(seed)
        return self.subset(np.sort(rng.choice(len(self), size=count, replace=False)))

    def counts(self) -> dict[str, int]:
        """Positives per attribute, samples per class, or per class of each question (multitask),
        or same/different pairs: what tests and reports check first."""
        if self.task == "attributes":
            return {name: int((self.targets[:, a] == 1).sum()) for a, name in enumerate(self.label_names)}
        if self.task == "classification":
            return {name: int((self.targets == c).sum()) for c, name in enumerate(self.label_names)}
        if self.task == "verification":
            same = int(self.pairs.same.sum())
            return {"same": same, "different": len(self.pairs) - same}
        if self.dense is not None:
            return {"faces": len(self), self.task: len(self.label_names)}
        counts = {
            f"{q}/{name}": int((y == c).sum())
            for q, (classes, y) in self.questions.items()
            for c, name in enumerate(classes)
        }
        counts.update({f"{name} labelled": int(np.isfinite(v).sum()) for name, v in self.values.items()})
        return counts


def find_first(root: Path, candidates: Sequence[str], what: str) -> Path:
    """The first of `candidates` (relative to root) that exists, or an error listing them all."""
    for candidate in candidates:
        path = root / candidate
        if path.exists():
            return path
    raise FileNotFoundError(
        f"{what}: none of {[str(root / c) for c in candidates]} exists; check benchmark.root={str(root)!r}"
    )


def inside(folder: str | os.PathLike, name: str) -> Path | None:
    """`folder / name` if it stays inside `folder` once `..` and symlinks are followed, else None.

    Benchmark files name their images; a name like `../../home/me/.ssh/id_rsa`, an absolute
    path or a symlink out of the folder must not make a reader open files elsewhere.
    """
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")):
        return None
    path = Path(folder) / name
    if "/" not in name and "\\" not in name and name not in (".", "..") and not os.path.islink(path):
        return path  # a plain file name in the folder: no lookup beyond one lstat
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(path)
    return path if os.path.commonpath([real_folder, real]) == real_folder else None


def check_split(split: str, available: Sequence[str], benchmark: str) -> None:
    if split not in available:
        raise ValueError(f"{benchmark} has no split {split!r}; it has {list(available)}")


def parse_binary(value: str, path: str | os.PathLike, line: int, column: str) -> int:
    """1 / 0 / -1 labels as written by the common layouts (1/-1, 1/0, true/false); empty = unlabelled."""
    v = value.strip().lower()
    if v in ("1", "1.0", "true", "yes"):
        return 1
    if v in ("-1", "0", "0.0", "-1.0", "false", "no"):
        return 0
    if v in ("", "nan", "na"):
        return -1
    raise MalformedFileError(path, line, f"column {column!r} has value {value!r}", "1/-1, 1/0 or true/false")
