"""Benchmark images aligned as `flip-data --align` aligns training faces (`benchmark.align`).

Protocols that align (the verification references, models trained on aligned crops) compare
faces put on one five-point template. The landmarks come from MTCNN at evaluation time, the
detector `flip-data` uses, so every benchmark reader gets alignment without a landmark file of
its own, and a model trained on `flip-data --align` shards is evaluated on faces cut the same
way. Each image's largest face is aligned (benchmark images hold one face); an image in which
MTCNN finds no face is evaluated as it is, and a warning names it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from flip.benchmarks.base import ImageSource
from flip.prepare.align import AlignConfig, align_face
from flip.prepare.detect import MtcnnFaceDetector, settings

__all__ = ["AlignedImages", "align_config"]

log = logging.getLogger(__name__)


def align_config(value: Any) -> AlignConfig | None:
    """`benchmark.align`: false/null (no alignment), true (224 px ArcFace template) or a mapping
    of AlignConfig's fields, e.g. {size: 224, padding: 0.25} to match `flip-data --align-padding`."""
    if value is None or value is False:
        return None
    if value is True:
        return AlignConfig()
    if isinstance(value, Mapping):
        unknown = set(value) - {"size", "padding"}
        if unknown:
            raise ValueError(f"benchmark.align has unknown keys {sorted(unknown)}; accepted: size, padding")
        return AlignConfig(**dict(value))
    raise ValueError(f"benchmark.align={value!r}; accepted: false, true or {{size: 224, padding: 0.0}}")


@dataclass(frozen=True)
class AlignedImages:
    """An ImageSource whose image i is image i of `images`, its largest face aligned."""

    images: ImageSource
    config: AlignConfig
    # threads=None: evaluation shares its process with the model, whose threads it must not cap
    detector: MtcnnFaceDetector = field(default_factory=lambda: MtcnnFaceDetector(threads=None))

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        image = self.images.load(index)
        faces = self.detector.detect(image)
        if not faces:
            log.warning("benchmark.align: no face found in %s; evaluated unaligned", self.describe(index))
            return image
        face = max(faces, key=lambda f: f.area)
        return align_face(image, np.asarray(face.landmarks), self.config).image

    def describe(self, index: int) -> str:
        return self.images.describe(index)

    def subset(self, indices: Sequence[int]) -> AlignedImages:
        return AlignedImages(self.images.subset(indices), self.config, self.detector)

    def fingerprint(self) -> str:
        parts = (self.images.fingerprint(), self.config.describe(), settings(self.detector))
        return hashlib.sha256(repr(("aligned", *parts)).encode()).hexdigest()[:24]
