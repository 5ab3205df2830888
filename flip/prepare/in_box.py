"""Landmarks for faces whose box is given (`flip-data facecaption15m --align`).

A FaceCaption-15M row names its face by a RetinaFace box but brings no landmarks, and aligning
needs five. So the landmark detector (MTCNN) looks for faces in a square search region around
the given box (the box's longer side grown by `SEARCH_MARGIN` on each side, padded black
beyond the image), scaled to `SEARCH_SIZE` pixels so that every region of a batch has the same
size and MTCNN runs them in one pass. Of the faces it finds, the one whose box overlaps the
given box most (intersection over union) is the row's face, if that overlap reaches `MIN_IOU`:
a face beside the subject (another person in the crowd) overlaps little and is never chosen.
MTCNN's boxes are tighter than RetinaFace's, so the overlap of the same face is typically 0.6
to 0.8, well above the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from flip.prepare.detect import FaceDetector
from flip.prepare.faces import Face

__all__ = [
    "MIN_IOU",
    "SEARCH_MARGIN",
    "SEARCH_SIZE",
    "best_match",
    "box_iou",
    "detect_in_boxes",
    "search_region",
]

Box = tuple[float, float, float, float]

SEARCH_MARGIN = 0.25  # of the box's longer side, on each side: MTCNN needs the face's surroundings
SEARCH_SIZE = 160  # pixels of the scaled search region; the given box spans about 107 of them
SEARCH_MIN_FACE = 40  # MTCNN's smallest face in the region: a face this small cannot reach MIN_IOU
MIN_IOU = 0.3


def search_region(box: Box, margin: float = SEARCH_MARGIN) -> tuple[int, int, int]:
    """(left, top, side) in whole pixels: the square around `box` where its face is looked for."""
    x0, y0, x1, y1 = box
    side = max(1, round(max(x1 - x0, y1 - y0) * (1 + 2 * margin)))
    return round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2), side


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (0 when they do not overlap)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _to_image(face: Face, left: int, top: int, scale: float) -> Face:
    """A face found in the scaled region, in the image's pixels (pixel centres kept aligned)."""

    def point(x: float, y: float) -> tuple[float, float]:
        return left + (x + 0.5) * scale - 0.5, top + (y + 0.5) * scale - 0.5

    (x0, y0), (x1, y1) = point(*face.box[:2]), point(*face.box[2:])
    marks = None if face.landmarks is None else tuple(point(x, y) for x, y in face.landmarks)
    return Face((x0, y0, x1, y1), face.score, marks)


def detect_in_boxes(
    detector: FaceDetector, images: Sequence[Image.Image], boxes: Sequence[Box]
) -> list[list[Face]]:
    """Every face `detector` finds in the search region of each (image, box), in image pixels."""
    regions, crops = [], []
    for image, box in zip(images, boxes, strict=True):
        left, top, side = search_region(box)
        crop = image.crop((left, top, left + side, top + side))  # black beyond the image
        crops.append(crop.resize((SEARCH_SIZE, SEARCH_SIZE), Image.Resampling.BILINEAR))
        regions.append((left, top, side / SEARCH_SIZE))
    found = detector.detect_batch(crops) if crops else []
    return [
        [_to_image(face, left, top, scale) for face in faces]
        for faces, (left, top, scale) in zip(found, regions, strict=True)
    ]


def best_match(faces: Sequence[Face], box: Box, min_iou: float = MIN_IOU) -> tuple[Face, float] | None:
    """The face overlapping `box` most and its IoU, or None when none reaches `min_iou`
    (ties go to the first, so the choice never depends on anything but the boxes)."""
    scored = [(box_iou(face.box, box), index) for index, face in enumerate(faces)]
    if not scored:
        return None
    iou, index = max(scored, key=lambda pair: (pair[0], -pair[1]))
    return (faces[index], iou) if iou >= min_iou else None
