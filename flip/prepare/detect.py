"""Face detectors for sources that come without a face box (`flip-data folder --detect-faces`).

A detector must run offline with weights that arrive through pip:

- `mtcnn` (the default): MTCNN from `facenet-pytorch`, whose wheel ships the P-, R- and O-net
  weights (1.9 MB). It returns boxes, confidences and the five landmarks that alignment needs,
  finds turned and tilted faces, and runs a batch of equally sized images in one pass (a GPU
  with `--detect-device cuda` gains most from that).
- `haar`: OpenCV's frontal-face Haar cascade, shipped inside `opencv-python-headless` 4.x
  (`cv2.data.haarcascades`). No landmarks and no confidence, misses strongly turned faces and
  finds some false ones (`min_neighbors` trades the two); kept as a fallback.

Both return every face they find (`flip.prepare.faces.Face`, in the image's pixels); which are
written is `flip.prepare.faces.select_faces`'s decision. Images are scaled so their long side
is at most `max_side` before detection (the cost grows with the pixel count) and the boxes and
landmarks scaled back. Detectors are picklable and load their model lazily, once per process.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import numpy as np
from PIL import Image

from flip.prepare.faces import Face

__all__ = ["CASCADES", "DETECTORS", "FaceDetector", "HaarFaceDetector", "MtcnnFaceDetector"]

CASCADES = {
    "default": "haarcascade_frontalface_default.xml",
    "alt": "haarcascade_frontalface_alt.xml",
    "alt2": "haarcascade_frontalface_alt2.xml",
}
# settings that change how fast faces are found, not which: left out of a shard's digest, so a
# run resumed on another machine (a GPU, more threads) keeps the shards already written
RUNTIME_SETTINGS = ("batch_size", "device", "threads")
MTCNN_WINDOW = 12  # P-net's input: the smallest face MTCNN can find, in pixels as detected


class FaceDetector(Protocol):
    name: ClassVar[str]
    landmarks: ClassVar[bool]  # whether its faces carry the five landmarks (alignment needs them)

    def load(self) -> Any: ...

    def check(self) -> None: ...

    def detect_batch(self, images: list[Image.Image]) -> list[list[Face]]: ...


def _scaled(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image, scale


def settings(detector: FaceDetector) -> dict[str, Any]:
    """What a shard's digest and the report record of a detector: its name and settings."""
    values = {f.name: getattr(detector, f.name) for f in fields(detector)}  # type: ignore[arg-type]
    return {"name": detector.name} | {k: v for k, v in values.items() if k not in RUNTIME_SETTINGS}


@dataclass
class MtcnnFaceDetector:
    """MTCNN (facenet-pytorch): every face with its confidence and five landmarks.

    `min_face_size` is the smallest face the image pyramid searches for, in pixels of the image
    as given (MTCNN cannot go below 12 pixels of the image as detected, after the `max_side`
    scaling). It sets the cost: the pyramid's first, largest level is the image scaled by
    12 / min_face_size, so searching from 64 px instead of 20 costs about half as much.
    `thresholds` are the P-, R- and O-net score cuts (facenet-pytorch's defaults). `threads`
    caps torch's threads in a worker process (one per core already); None leaves them as they
    are, as evaluation, which shares its process with the model, must.
    """

    name: ClassVar[str] = "mtcnn"
    landmarks: ClassVar[bool] = True
    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709
    max_side: int = 640
    batch_size: int = 16
    device: str = "cpu"
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.min_face_size < MTCNN_WINDOW:
            raise ValueError(
                f"min_face_size={self.min_face_size}; accepted: >= {MTCNN_WINDOW} (MTCNN's window)"
            )
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"factor={self.factor}; accepted: between 0 and 1 (the pyramid's scale step)")
        if self.batch_size < 1 or self.max_side < 12:
            raise ValueError(f"batch_size={self.batch_size}, max_side={self.max_side}; accepted: >= 1, >= 12")
        self.thresholds = tuple(float(t) for t in self.thresholds)  # type: ignore[assignment]
        self._model = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_model"} | {"_model": None}

    def load(self):
        """facenet-pytorch's MTCNN, weights from its wheel (loaded once per process)."""
        if self._model is None:
            import torch

            try:
                from facenet_pytorch import MTCNN
            except ImportError as exc:  # pragma: no cover - a dependency of the project
                raise ImportError(
                    "--detector mtcnn needs facenet-pytorch: pip install facenet-pytorch==2.5.3 --no-deps"
                ) from exc
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            self._model = MTCNN(
                min_face_size=self.min_face_size,
                thresholds=list(self.thresholds),
                factor=self.factor,
                keep_all=True,
                select_largest=False,
                device=torch.device(self.device),
            ).eval()
        return self._model

    def check(self) -> None:
        """Fails now, naming what is missing (the package, its weights, the device), rather than
        in a worker. Nothing is built on a GPU here: workers are forked, and CUDA started in
        their parent would not work in them."""
        import torch

        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(
                f"--detect-device {self.device!r} is no torch device; accepted: cpu, cuda, cuda:1, ..."
            ) from None
        if device.type == "cpu":
            self.load()
        elif device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--detect-device {self.device!r}: torch sees no CUDA device; use cpu")
        else:
            import facenet_pytorch  # noqa: F401

    def detect(self, image: Image.Image) -> list[Face]:
        return self.detect_batch([image])[0]

    def detect_batch(self, images: list[Image.Image]) -> list[list[Face]]:
        """Faces of each image; images of equal size after scaling are detected together, up to
        `batch_size` at a time (MTCNN batches only equally sized images)."""
        model = self.load()
        scaled = [_scaled(image.convert("RGB"), self.max_side) for image in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (image, _) in enumerate(scaled):
            groups.setdefault(image.size, []).append(index)
        found: list[list[Face]] = [[] for _ in images]
        for indices in groups.values():
            model.min_face_size = max(MTCNN_WINDOW, round(self.min_face_size * scaled[indices[0]][1]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                boxes, probs, points = model.detect([scaled[i][0] for i in chunk], landmarks=True)
                for i, b, p, lm in zip(chunk, boxes, probs, points, strict=True):
                    found[i] = [] if b is None else _faces(b, p, lm, scaled[i][1])
        return found


def _faces(boxes: np.ndarray, probs: np.ndarray, points: np.ndarray, scale: float) -> list[Face]:
    return [
        Face(
            tuple(float(v) / scale for v in box),  # type: ignore[arg-type]
            float(prob),
            tuple((float(x) / scale, float(y) / scale) for x, y in marks),
        )
        for box, prob, marks in zip(boxes, probs, points, strict=True)
    ]


@dataclass
class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade: boxes only (no confidence, no landmarks)."""

    name: ClassVar[str] = "haar"
    landmarks: ClassVar[bool] = False
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
                    "--detector haar needs OpenCV: pip install opencv-python-headless (4.x has the cascades)"
                ) from exc
            cv2.setNumThreads(1)  # one process per core already; threads would oversubscribe
            path = f"{cv2.data.haarcascades}{CASCADES[self.cascade]}"
            classifier = cv2.CascadeClassifier(path)
            if classifier.empty():
                raise RuntimeError(f"OpenCV could not load its bundled cascade {path!r}")
            self._classifier = classifier
        return self._classifier

    def check(self) -> None:
        self.load()

    def detect(self, image: Image.Image) -> list[Face]:
        import cv2

        classifier = self.load()
        gray, scale = _scaled(image.convert("L"), self.max_side)
        faces = classifier.detectMultiScale(
            cv2.equalizeHist(np.asarray(gray)),
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
        )
        return [
            Face((x / scale, y / scale, (x + w) / scale, (y + h) / scale))
            for x, y, w, h in (tuple(int(v) for v in f) for f in faces)
        ]

    def detect_batch(self, images: list[Image.Image]) -> list[list[Face]]:
        return [self.detect(image) for image in images]


DETECTORS: dict[str, type] = {"mtcnn": MtcnnFaceDetector, "haar": HaarFaceDetector}
