"""Labelled webdataset shards (FaceShapes, or img2dataset output with labels in `.json`) as a split.

Each sample is `{key}.jpg` (or another of `IMAGE_EXTENSIONS`), `{key}.txt` (caption) and
`{key}.json` (labels).
Encoded images are held in memory (a few KB each), so features can be extracted by any
loader without re-reading the tars. A sample lacking an image or readable labels is skipped
and counted, as training skips it. Shards are read by `flip.data.shards`, as training
reads them: only images, captions and `.json` are read, and `.json` is parsed by `json.loads`;
no other member (`.pyd`, `.pth`, ... which webdataset would unpickle) is touched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from flip.benchmarks.base import EncodedImages, LabelledSplit
from flip.data.shards import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    METADATA_MEMBER,
    ShardError,
    decode_json,
    iter_tar_samples,
    pick,
)

log = logging.getLogger(__name__)


def _samples(url: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of one tar, in order; a truncated tar keeps what was read."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        for sample in iter_tar_samples(url):
            samples.append(sample)
    except ShardError as exc:
        log.warning("shard %s: %s past %d samples (%s)", url, exc.reason, len(samples), exc.detail)
    return samples


def _class_index(value: object, classes: Sequence[str]) -> int:
    if value is None:
        return -1
    if value not in classes:
        raise ValueError(f"label {value!r} is outside the classes {list(classes)}")
    return list(classes).index(value)


def read_labelled_shards(
    urls: Sequence[str],
    split: str,
    attributes: Sequence[str],
    questions: Mapping[str, Sequence[str]] | None = None,
    benchmark: str = "shards",
) -> LabelledSplit:
    """Binary `attributes` and multi-class `questions` (name -> classes) read from each sample's .json."""
    questions = {k: list(v) for k, v in (questions or {}).items()}
    blobs, keys, captions, targets, answers, skipped = [], [], [], [], {q: [] for q in questions}, 0
    for url in urls:
        for key, sample in _samples(url):
            image = pick(sample, IMAGE_EXTENSIONS)
            try:
                meta = decode_json(sample[METADATA_MEMBER])
                row = [-1 if meta.get(a) is None else int(bool(meta[a])) for a in attributes]
                answer = {q: _class_index(meta.get(q), c) for q, c in questions.items()}
            except (KeyError, ValueError, TypeError) as exc:
                image = None
                log.warning("skipped sample %s of %s: unusable labels (%s)", key, url, exc)
            if image is None:
                skipped += 1
                continue
            blobs.append(image)
            keys.append(key)
            text = pick(sample, CAPTION_EXTENSIONS) or b""
            captions.append(text.decode("utf-8", errors="replace"))
            targets.append(row)
            for q in questions:
                answers[q].append(answer[q])
    if not keys:
        raise ValueError(f"no usable labelled samples in {len(urls)} shard(s), e.g. {urls[:1]}")
    if skipped:
        log.warning("%s/%s: skipped %d unusable samples", benchmark, split, skipped)
    return LabelledSplit(
        benchmark=benchmark,
        split=split,
        task="attributes",
        label_names=list(attributes),
        targets=np.asarray(targets, dtype=np.int8).reshape(len(keys), len(attributes)),
        images=EncodedImages(tuple(blobs), tuple(keys)),
        keys=keys,
        captions=captions,
        questions={q: (c, np.asarray(answers[q], dtype=np.int64)) for q, c in questions.items()},
        skipped=skipped,
    )


def read_faceshapes(
    root: str | os.PathLike,
    split: str,
    attributes: Sequence[str] | None = None,
    questions: Mapping[str, Sequence[str]] | None = None,
) -> LabelledSplit:
    """A split of a generated FaceShapes dataset (its manifest.json names the shards)."""
    from flip.data.faceshapes import BINARY_ATTRIBUTES, MULTICLASS_ATTRIBUTES
    from flip.data.faceshapes.generate import MANIFEST, FaceShapesManifest

    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(
            f"no FaceShapes dataset at {str(root)!r} (no {MANIFEST}); generate it with "
            f"`python -m flip.data.faceshapes.generate --root {root}` or by running train.py"
        )
    urls = FaceShapesManifest.load(root).urls(split)
    return read_labelled_shards(
        urls,
        split,
        BINARY_ATTRIBUTES if attributes is None else attributes,
        MULTICLASS_ATTRIBUTES if questions is None else questions,
        benchmark="faceshapes",
    )
