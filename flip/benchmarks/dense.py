"""Dense labels of a split: a label mask per face (parsing) or points per face (landmarks).

The parsing and landmark benchmarks (LaPa, CelebAMask-HQ, WFLW, 300W, AFLW-19, FaceShapes
with parts) read into a LabelledSplit whose `dense` holds these, in each image's own pixel
coordinates: masks are read when asked for (a split's masks would not fit in memory), points
are one array. What a dense protocol crops and feeds the tower is decided here too, so every
benchmark's faces are cut the same way: the face box (or, without one, the whole image) made
square around its centre and scaled by `box_scale`; pixels of the square outside the image
are padding, which a label map marks `IGNORE` and no metric counts.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np
from PIL import Image

from flip.benchmarks.base import digest

PARSING, LANDMARKS = "parsing", "landmarks"
DENSE_TASKS = (PARSING, LANDMARKS)
IGNORE = 255  # a label-map pixel no loss or metric counts (padding outside the image)


class MaskSource(Protocol):
    """Loads mask i as uint8 [height, width] class ids; `describe(i)` names it in messages."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> np.ndarray: ...

    def describe(self, index: int) -> str: ...

    def subset(self, indices: Sequence[int]) -> MaskSource: ...


def _class_ids(image: Image.Image, where: str) -> np.ndarray:
    """A label image's pixels as class ids: grayscale (L) or palette (P) values as stored."""
    if image.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(f"{where}: a label mask is {image.mode}; expected a grayscale or palette PNG")
    return np.asarray(image, dtype=np.int64).astype(np.uint8)


@dataclass(frozen=True)
class MaskFiles:
    """One label PNG per face, each pixel the class id (LaPa's `labels/<name>.png`)."""

    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        with Image.open(self.paths[index]) as image:
            return _class_ids(image, self.paths[index])

    def describe(self, index: int) -> str:
        return self.paths[index]

    def subset(self, indices: Sequence[int]) -> MaskFiles:
        return MaskFiles(tuple(self.paths[i] for i in indices))


@dataclass(frozen=True)
class LayeredMasks:
    """Binary PNGs per class, painted in order onto one mask (CelebAMask-HQ's
    `<N>_<class>.png`): `layers[i]` lists (class id, path) of face i, later ones on top; a
    pixel not 0 in a layer takes its class. Every mask is `size` (height, width)."""

    layers: tuple[tuple[tuple[int, str], ...], ...]
    size: tuple[int, int]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, index: int) -> np.ndarray:
        mask = np.zeros(self.size, dtype=np.uint8)
        for class_id, path in self.layers[index]:
            with Image.open(path) as image:
                layer = np.asarray(image.convert("L"))
            if layer.shape != self.size:
                raise ValueError(
                    f"{path}: a mask layer of {layer.shape[::-1]} px; expected {self.size[::-1]}"
                )
            mask[layer != 0] = class_id
        return mask

    def describe(self, index: int) -> str:
        return self.names[index]

    def subset(self, indices: Sequence[int]) -> LayeredMasks:
        return LayeredMasks(
            tuple(self.layers[i] for i in indices), self.size, tuple(self.names[i] for i in indices)
        )


@dataclass(frozen=True)
class EncodedMasks:
    """Label PNGs held as bytes (FaceShapes' `parts.png` shard members)."""

    blobs: tuple[bytes, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.blobs)

    def load(self, index: int) -> np.ndarray:
        with Image.open(io.BytesIO(self.blobs[index])) as image:
            return _class_ids(image, self.names[index])

    def describe(self, index: int) -> str:
        return self.names[index]

    def subset(self, indices: Sequence[int]) -> EncodedMasks:
        return EncodedMasks(tuple(self.blobs[i] for i in indices), tuple(self.names[i] for i in indices))


@dataclass(frozen=True)
class Crop:
    """A square of the image, `side` pixels from (x0, y0) (integers; it may reach past the image)."""

    x0: int
    y0: int
    side: int


@dataclass(frozen=True)
class DenseLabels:
    """What a parsing or landmark split holds beyond its images.

    - `kind`: "parsing" (`masks`, class ids named by `names`) or "landmarks" (`points`
      [N, K, 2] x, y in image pixels, `norms` [N] each face's NME normaliser in the same pixels,
      `normaliser` saying which one; `names` the points');
    - `boxes`: [N, 4] face boxes (x0, y0, x1, y1) in image pixels, or None: the whole image;
    - `box_scale`: the square crop's side over the box's longer side.
    """

    kind: Literal["parsing", "landmarks"]
    names: tuple[str, ...]
    masks: MaskSource | None = None
    points: np.ndarray | None = None
    norms: np.ndarray | None = None
    normaliser: str = ""
    boxes: np.ndarray | None = None
    box_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in DENSE_TASKS:
            raise ValueError(f"dense labels of kind {self.kind!r}; expected one of {DENSE_TASKS}")
        if self.kind == PARSING and self.masks is None:
            raise ValueError("parsing labels need masks")
        if self.kind == LANDMARKS:
            if self.points is None or self.norms is None:
                raise ValueError("landmark labels need points and their normalisers (norms)")
            if self.points.ndim != 3 or self.points.shape[1:] != (len(self.names), 2):
                raise ValueError(f"points of shape {self.points.shape}; expected [N, {len(self.names)}, 2]")
            if self.norms.shape != (len(self.points),) or not np.all(self.norms > 0):
                raise ValueError(f"norms of shape {self.norms.shape}: one positive distance per face")
        if self.boxes is not None and self.boxes.shape != (len(self), 4):
            raise ValueError(f"boxes of shape {self.boxes.shape}; expected [{len(self)}, 4]")
        if not self.box_scale > 0:
            raise ValueError(f"box_scale={self.box_scale} must be positive")

    def __len__(self) -> int:
        return len(self.masks) if self.kind == PARSING else len(self.points)

    def subset(self, indices: Sequence[int] | np.ndarray) -> DenseLabels:
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            masks=None if self.masks is None else self.masks.subset(idx.tolist()),
            points=None if self.points is None else self.points[idx],
            norms=None if self.norms is None else self.norms[idx],
            boxes=None if self.boxes is None else self.boxes[idx],
        )

    def crop(self, index: int, width: int, height: int) -> Crop:
        """The square a dense protocol cuts from image `index` (`width` x `height` pixels)."""
        x0, y0, x1, y1 = (0.0, 0.0, float(width), float(height)) if self.boxes is None else self.boxes[index]
        side = max(1, round(max(x1 - x0, y1 - y0) * self.box_scale))
        return Crop(math.floor((x0 + x1 - side) / 2 + 0.5), math.floor((y0 + y1 - side) / 2 + 0.5), side)

    def fingerprint(self) -> str:
        """What changes the crops: the boxes and their scale (the cache key of the cropped images)."""
        boxes = None if self.boxes is None else np.ascontiguousarray(self.boxes, dtype=np.float64).tobytes()
        return digest("dense crops", boxes, self.box_scale)


def label_map(mask: np.ndarray, image_size: tuple[int, int], crop: Crop, size: int) -> np.ndarray:
    """The mask's classes at the centres of a `size` x `size` grid laid over `crop` (nearest
    pixel; the mask may have another resolution than its image, as CelebAMask-HQ's 512 px
    masks of 1024 px images); `IGNORE` where the grid leaves the image."""
    width, height = image_size
    rows, cols = mask.shape
    centres = (np.arange(size) + 0.5) * crop.side / size
    u = np.floor((crop.x0 + centres) * cols / width).astype(np.int64)
    v = np.floor((crop.y0 + centres) * rows / height).astype(np.int64)
    inside = ((v >= 0) & (v < rows))[:, None] & ((u >= 0) & (u < cols))[None, :]
    out = np.full((size, size), IGNORE, dtype=np.uint8)
    out[inside] = mask[np.clip(v, 0, rows - 1)[:, None], np.clip(u, 0, cols - 1)[None, :]][inside]
    return out


def points_to_crop(points: np.ndarray, crop: Crop) -> np.ndarray:
    """Image-pixel points [..., 2] as fractions of the crop (0..1 across it)."""
    return (points - np.asarray([crop.x0, crop.y0], dtype=np.float64)) / crop.side


def points_from_crop(fractions: np.ndarray, crop: Crop) -> np.ndarray:
    """The inverse of `points_to_crop`: crop fractions back to image pixels."""
    return fractions * crop.side + np.asarray([crop.x0, crop.y0], dtype=np.float64)


def points_box(points: np.ndarray) -> np.ndarray:
    """[N, 4] (x0, y0, x1, y1): the box around each face's points (300W has no other)."""
    return np.concatenate([points.min(axis=1), points.max(axis=1)], axis=1)


def interocular(points: np.ndarray, left: int | Sequence[int], right: int | Sequence[int]) -> np.ndarray:
    """[N] distances between two points (or the means of two groups of points) of each face."""
    a = points[:, np.atleast_1d(left)].mean(axis=1)
    b = points[:, np.atleast_1d(right)].mean(axis=1)
    return np.linalg.norm(a - b, axis=-1)
