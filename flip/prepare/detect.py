"""Face detection for sources that come without a face box (`flip-data folder --detect-faces`).

The detector must run offline with weights that arrive through pip, so it is OpenCV's Haar
cascade for frontal faces, which ships inside `opencv-python-headless` 4.x
(`cv2.data.haarcascades`); OpenCV's YuNet and the DNN detectors need a model file that no
PyPI package of theirs ships. Haar cascades miss strongly turned faces and find some false
ones; `min_neighbors` trades the two. The largest detection is kept: a caption describes one
person, and in a portrait that person is the biggest face.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["CASCADES", "HaarFaceDetector"]

CASCADES = {
    "default": "haarcascade_frontalface_default.xml",
    "alt": "haarcascade_frontalface_alt.xml",
    "alt2": "haarcascade_frontalface_alt2.xml",
}


@dataclass
class HaarFaceDetector:
    """Largest frontal face as (x0, y0, x1, y1), or None; picklable, loads its cascade lazily.

    Images are scaled so their long side is at most `max_side` before detection (Haar cost
    grows with pixel count), and the box is scaled back.
    """

    cascade: str = "default"
    scale_factor: float = 1.1
    min_neighbors: int = 4
    min_size: int = 24
    max_side: int = 640

    def __post_init__(self) -> None:
        if self.cascade not in CASCADES:
            raise ValueError(f"unknown cascade {self.cascade!r}; accepted: {', '.join(CASCADES)}")
        if self.scale_factor <= 1.0:
            raise ValueError(f"scale_factor={self.scale_factor}; accepted: > 1.0")
        self._classifier = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_classifier"} | {"_classifier": None}

    def load(self):
        """The OpenCV classifier (loaded once per process)."""
        if self._classifier is None:
            try:
                import cv2
            except ImportError as exc:  # pragma: no cover - a dependency of the project
                raise ImportError(
                    "--detect-faces needs OpenCV: pip install opencv-python-headless (4.x ships the cascades)"
                ) from exc
            cv2.setNumThreads(1)  # one process per core already; threads would oversubscribe
            path = f"{cv2.data.haarcascades}{CASCADES[self.cascade]}"
            classifier = cv2.CascadeClassifier(path)
            if classifier.empty():
                raise RuntimeError(f"OpenCV could not load its bundled cascade {path!r}")
            self._classifier = classifier
        return self._classifier

    def detect(self, image: Image.Image) -> tuple[float, float, float, float] | None:
        import cv2

        classifier = self.load()
        scale = min(1.0, self.max_side / max(image.size))
        gray = image.convert("L")
        if scale < 1.0:
            gray = gray.resize(
                (round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR
            )
        faces = classifier.detectMultiScale(
            cv2.equalizeHist(np.asarray(gray)),
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
        )
        if len(faces) == 0:
            return None
        x, y, w, h = max((tuple(int(v) for v in f) for f in faces), key=lambda f: (f[2] * f[3], f))
        return x / scale, y / scale, (x + w) / scale, (y + h) / scale
