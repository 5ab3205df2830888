"""Small images written the ways benchmarks, shards and folders hold them: distinct colours, so a
test can tell them apart and a model can separate them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def jpeg_bytes(colour: tuple[int, int, int], side: int = 40) -> bytes:
    """A one-colour JPEG, as a shard or an upload holds it."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_image(
    path: Path, colour: tuple[int, int, int] = (120, 60, 30), size: tuple[int, int] = (12, 10)
) -> Path:
    """A one-colour image file at `path` (its format from the suffix), folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_square(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    """A 20x20 square of `colour` with per-pixel noise: same-class images that are not identical."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, size=(20, 20, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
