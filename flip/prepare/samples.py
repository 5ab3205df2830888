"""One shard's items turned into samples: decode, detect faces, choose them, crop or align, encode.

Items are decoded a batch at a time so the detector sees a batch (`batch_size` of the
detector): MTCNN runs equally sized images in one pass. An item with its own face box (a
FaceCaption-15M row) is cropped by it and never detected; to be aligned it needs landmarks, so
the detector looks for its face around the box (`flip.prepare.in_box`). Every image or face
that does not become a sample is counted (`SkipLog` for samples, `FaceTally` for the faces a
detector found), never raised: one bad file costs one sample, not the run.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from flip.data.shards import CAPTION_MEMBER, IMAGE_MEMBER, METADATA_MEMBER
from flip.prepare.align import AlignConfig, align_face
from flip.prepare.detect import FaceDetector
from flip.prepare.faces import Face, FacePolicy, face_record, select_faces
from flip.prepare.hygiene import (
    DecodedImage,
    HygieneConfig,
    ProcessedImage,
    SkipSample,
    check_face,
    decode_rgb,
    encode_jpeg,
    finish,
)
from flip.prepare.in_box import MIN_IOU, best_match, detect_in_boxes
from flip.prepare.report import SkipLog

if TYPE_CHECKING:
    from flip.prepare.writer import Item

__all__ = ["FaceSteps", "FaceTally", "shard_samples"]


@dataclass(frozen=True)
class FaceSteps:
    """How faces are found and written: a detector (None: only given boxes are cropped), which
    of its faces are kept, and whether they are aligned (None: cropped by their box). With
    `align`, an item's given box is aligned too: the detector finds its landmarks around it."""

    detector: FaceDetector | None = None
    policy: FacePolicy = field(default_factory=FacePolicy)
    align: AlignConfig | None = None

    def __post_init__(self) -> None:
        if self.align is not None and (self.detector is None or not self.detector.landmarks):
            raise ValueError(
                "aligning needs five landmarks per face: detect faces with a detector that gives them "
                "(--detect-faces --detector mtcnn)"
            )


@dataclass
class FaceTally:
    """Faces the detector found in a shard's images, how many were chosen, and why the rest were not."""

    detected: int = 0
    selected: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        rejected = dict(sorted(self.rejected.items()))
        return {"detected": self.detected, "selected": self.selected, "rejected": rejected}

    def merge(self, other: dict[str, Any]) -> None:
        self.detected += other["detected"]
        self.selected += other["selected"]
        self.rejected.update(other["rejected"])


def _record(item: Item, key: str, processed: ProcessedImage, extra: dict[str, Any]) -> bytes:
    record = dict(item.metadata)
    record.update(
        key=key,
        caption=item.caption,
        source=item.image.describe(),
        width=processed.width,
        height=processed.height,
        original_width=processed.original_width,
        original_height=processed.original_height,
    )
    if processed.crop is not None:
        record["crop"] = list(processed.crop)
    record.update(extra)
    return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")


def _face_sample(
    decoded: DecodedImage, face: Face, hygiene: HygieneConfig, align: AlignConfig | None
) -> tuple[ProcessedImage, dict[str, Any]]:
    if align is None:
        return finish(decoded, hygiene, face.box), {}
    try:
        aligned = align_face(decoded.image, np.asarray(face.landmarks), align)
    except ValueError as exc:
        raise SkipSample("bad_landmarks", str(exc)) from None
    width, height = decoded.original_size
    jpeg = encode_jpeg(aligned.image, hygiene.jpeg_quality)
    return ProcessedImage(jpeg, align.size, align.size, width, height, None), {"align": aligned.record(align)}


@dataclass
class BoxMatch:
    """The face the detector found for an item's given box (`box`: that box, clipped to the
    image), and how well their boxes overlap."""

    face: Face
    box: tuple[float, float, float, float]
    iou: float


def _match_given_boxes(
    decoded: list[tuple[Item, DecodedImage]], steps: FaceSteps, hygiene: HygieneConfig, tally: FaceTally
) -> dict[int, BoxMatch | SkipSample]:
    """For each item with a given box (by position in `decoded`): its face, found with landmarks
    around the box in one detector batch, or why it has none."""
    matches: dict[int, BoxMatch | SkipSample] = {}
    wanted: list[tuple[int, tuple[float, float, float, float]]] = []
    for index, (item, image) in enumerate(decoded):
        if item.box is not None:
            try:
                wanted.append((index, check_face(item.box, image.image.size, hygiene.min_face_size)))
            except SkipSample as skip:
                matches[index] = skip
    images = [decoded[index][1].image for index, _ in wanted]
    found = detect_in_boxes(steps.detector, images, [box for _, box in wanted])  # type: ignore[arg-type]
    for (index, box), faces in zip(wanted, found, strict=True):
        tally.detected += len(faces)
        match = best_match(faces, box)
        if match is None:
            tally.rejected["not_in_box"] += len(faces)
            given = ", ".join(f"{v:.1f}" for v in box)
            matches[index] = SkipSample(
                "no_face_in_box", f"{len(faces)} face(s) around the box ({given}), none with IoU >= {MIN_IOU}"
            )
            continue
        face, iou = match
        tally.rejected["not_in_box"] += len(faces) - 1
        if face.score is not None and face.score < steps.policy.min_confidence:
            tally.rejected["low_confidence"] += 1
            matches[index] = SkipSample("low_confidence", f"{face.score:.4f} < {steps.policy.min_confidence}")
            continue
        tally.selected += 1
        matches[index] = BoxMatch(face, box, iou)
    return matches


def _boxed_sample(
    item: Item, decoded: DecodedImage, match: BoxMatch | SkipSample, steps: FaceSteps, hygiene: HygieneConfig
) -> tuple[ProcessedImage, dict[str, Any]]:
    """An item with a given box, aligned by the landmarks of the face matched to it; its `.json`
    keeps the given box (in the stored image's pixels) and the overlap beside the face."""
    if isinstance(match, SkipSample):
        raise match
    record = face_record(match.face, 0, 1, steps.detector.name)  # type: ignore[union-attr]
    record.update(given_box=[round(v, 2) for v in match.box], iou=round(match.iou, 4))
    processed, more = _face_sample(decoded, match.face, hygiene, steps.align)
    return processed, {"face": record} | more


def _item_samples(
    item: Item,
    decoded: DecodedImage,
    found: list[Face] | None,
    steps: FaceSteps,
    hygiene: HygieneConfig,
    tally: FaceTally,
) -> Iterator[tuple[str, ProcessedImage | SkipSample, dict[str, Any]]]:
    """(key, the processed image or why it was skipped, extra `.json` entries) per sample of an item."""
    if found is None:
        yield item.key, finish(decoded, hygiene, item.box), {}
        return
    selection = select_faces(found, steps.policy)
    tally.detected += len(found)
    tally.selected += len(selection.kept)
    tally.rejected.update(selection.rejected)
    if not selection.kept:
        size = f"{decoded.image.width}x{decoded.image.height}"
        detail = f"{len(found)} face(s) found in the {size} image, none kept"
        raise SkipSample(selection.skip_reason or "no_face", detail)
    for index, face in enumerate(selection.kept):
        key = item.key if steps.policy.keep == "largest" else f"{item.key}_face{index}"
        extra = {"face": face_record(face, index, len(selection.kept), steps.detector.name)}  # type: ignore[union-attr]
        try:
            processed, more = _face_sample(decoded, face, hygiene, steps.align)
        except SkipSample as skip:
            yield key, skip, {}
            continue
        yield key, processed, extra | more


def _decode_all(items: list[Item], hygiene: HygieneConfig, skips: SkipLog) -> list[tuple[Item, DecodedImage]]:
    decoded = []
    for item in items:
        try:
            decoded.append((item, decode_rgb(item.image.read(), hygiene)))
        except SkipSample as skip:
            skips.add(skip.reason, item.key, f"{item.image.describe()}: {skip.detail}")
        except Exception as exc:  # an unforeseen decoder failure costs one sample, not the run
            skips.add("corrupt_image", item.key, f"{item.image.describe()}: {type(exc).__name__}: {exc}")
    return decoded


def shard_samples(
    items: list[Item], hygiene: HygieneConfig, steps: FaceSteps, skips: SkipLog, tally: FaceTally
) -> Iterator[dict[str, Any]]:
    """The webdataset samples of a shard's items, in item order (an item's faces largest first)."""
    detector = steps.detector
    batch_size = getattr(detector, "batch_size", 1) if detector is not None else 1
    seen: set[str] = set()
    for start in range(0, len(items), batch_size):
        decoded = _decode_all(items[start : start + batch_size], hygiene, skips)
        wanted = [d.image for item, d in decoded if item.box is None] if detector is not None else []
        detections = iter(detector.detect_batch(wanted) if wanted else [])  # type: ignore[union-attr]
        boxed = _match_given_boxes(decoded, steps, hygiene, tally) if steps.align is not None else {}
        for index, (item, image) in enumerate(decoded):
            found = next(detections) if detector is not None and item.box is None else None
            where = item.image.describe()
            try:
                if index in boxed:
                    samples = iter([(item.key, *_boxed_sample(item, image, boxed[index], steps, hygiene))])
                else:
                    samples = _item_samples(item, image, found, steps, hygiene, tally)
                for key, processed, extra in samples:
                    if isinstance(processed, SkipSample):
                        skips.add(processed.reason, key, f"{where}: {processed.detail}")
                    elif key in seen:  # `{key}_face1` of --faces all met an item of that name
                        skips.add("duplicate_key", key, f"{where}: key already used in this shard")
                    else:
                        seen.add(key)
                        yield {
                            "__key__": key,
                            IMAGE_MEMBER: processed.jpeg,
                            CAPTION_MEMBER: item.caption.encode("utf-8"),
                            METADATA_MEMBER: _record(item, key, processed, extra),
                        }
            except SkipSample as skip:
                skips.add(skip.reason, item.key, f"{where}: {skip.detail}")
            except Exception as exc:  # an unforeseen failure costs one sample, not the run
                skips.add("corrupt_image", item.key, f"{where}: {type(exc).__name__}: {exc}")
