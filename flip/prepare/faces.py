"""Detected faces and which of them become samples.

A detector (`flip.prepare.detect`) returns every face it finds; this module decides which are
written, so both detectors obey the same rules and every face left out is counted under a
reason. The defaults are FaceCaption-15M's: its faces were cut from LAION-Face with RetinaFace,
keeping boxes with confidence > 0.98 and sides > 128 px. A caption describes one person, and in
a photo of several people the subject is usually the largest face, so one face (the largest)
is kept per image unless all are asked for.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["KEEP", "REJECTIONS", "Face", "FacePolicy", "Selection", "face_record", "select_faces"]

KEEP = ("largest", "all")
# why a detected face is not written (counted per face in report.json's "faces")
REJECTIONS: dict[str, str] = {
    "low_confidence": "the detector's confidence is below --min-confidence",
    "small_face": "the box's shorter side is below --min-face-size",
    "not_largest": "--faces largest: a smaller face of an image whose largest face was written",
    "not_in_box": "--align on given boxes: a face found around a row's box, not the one matching it best",
}


@dataclass(frozen=True)
class Face:
    """A face in image pixels: box (x0, y0, x1, y1), the detector's confidence (None: the Haar
    cascade has none) and five landmarks (left eye, right eye, nose, left and right mouth
    corner, "left" as seen in the image; None: the detector gives none)."""

    box: tuple[float, float, float, float]
    score: float | None = None
    landmarks: tuple[tuple[float, float], ...] | None = None

    @property
    def size(self) -> float:
        """The shorter side of the box: what --min-face-size compares with."""
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True)
class FacePolicy:
    """Which detected faces are written: confident enough, large enough, the largest or all."""

    min_confidence: float = 0.98
    min_size: float = 128
    keep: str = "largest"

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence={self.min_confidence}; accepted: 0..1")
        if self.min_size < 0:
            raise ValueError(f"min_size={self.min_size}; accepted: >= 0 (pixels)")
        if self.keep not in KEEP:
            raise ValueError(f"keep={self.keep!r}; accepted: {', '.join(KEEP)}")


@dataclass
class Selection:
    """The faces to write (largest first), the rejected ones by reason, and, when none is
    written, the reason of the sample's skip (`no_face`, `low_confidence` or `small_face`)."""

    kept: list[Face]
    rejected: Counter[str] = field(default_factory=Counter)
    skip_reason: str | None = None


def _reason(face: Face, policy: FacePolicy) -> str | None:
    if face.score is not None and face.score < policy.min_confidence:
        return "low_confidence"
    if face.size < policy.min_size:
        return "small_face"
    return None


def select_faces(faces: list[Face], policy: FacePolicy) -> Selection:
    """The faces of one image that `policy` writes, ordered by area (largest first; ties by
    position, so the order never depends on the detector's). An image with no face written
    is skipped for the reason of its largest detection, or `no_face` when there was none."""
    ordered = sorted(faces, key=lambda f: (-f.area, f.box[0], f.box[1]))
    selection = Selection([])
    for face in ordered:
        reason = _reason(face, policy)
        if reason is None and policy.keep == "largest" and selection.kept:
            reason = "not_largest"
        if reason is None:
            selection.kept.append(face)
        else:
            selection.rejected[reason] += 1
    if not selection.kept:
        selection.skip_reason = "no_face" if not ordered else _reason(ordered[0], policy)
    return selection


def face_record(face: Face, index: int, written: int, detector: str) -> dict:
    """The face's entry in its sample's `.json` (pixels of the upright original image): it is
    face `index` (0 = largest) of the `written` faces its image gave."""
    marks = face.landmarks or ()
    return {
        "detector": detector,
        "box": [round(v, 2) for v in face.box],
        "confidence": None if face.score is None else round(face.score, 6),
        "landmarks": None if face.landmarks is None else [[round(x, 2), round(y, 2)] for x, y in marks],
        "index": index,
        "faces_written": written,
    }
