"""FaceShapes with parts as a parsing or landmark benchmark: the dense demo tasks.

A FaceShapes dataset generated with `--parts` (`ensure_faceshapes(..., parts=True)`) holds,
beside each face, its part mask (`{key}.parts.png`, ids into PART_CLASSES) and its landmarks
(`landmarks` in `{key}.json`, x y in image pixels). The shards are read as training reads
them: only these members, `.json` through `json.loads`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flip.benchmarks.base import EncodedImages, LabelledSplit
from flip.benchmarks.dense import LANDMARKS, PARSING, DenseLabels, EncodedMasks, interocular
from flip.data.shards import IMAGE_EXTENSIONS, METADATA_MEMBER, decode_json, iter_tar_samples, pick

TASKS = (PARSING, LANDMARKS)


def read_faceshapes_dense(root: str | os.PathLike, split: str, task: str = PARSING) -> LabelledSplit:
    """A split of FaceShapes with parts as a `task` ("parsing" or "landmarks") split; its NME
    normaliser is the distance between the eye centres (FaceShapes draws no eye corners)."""
    from flip.data.faceshapes.generate import MANIFEST, PARTS_MEMBER, FaceShapesManifest
    from flip.data.faceshapes.render import LANDMARKS as POINTS
    from flip.data.faceshapes.render import PART_CLASSES

    if task not in TASKS:
        raise ValueError(f"faceshapes dense task {task!r}; expected one of {TASKS}")
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(
            f"no FaceShapes dataset at {str(root)!r} (no {MANIFEST}); generate one with parts: "
            f"`python -m flip.data.faceshapes.generate --root {root} --parts`"
        )
    manifest = FaceShapesManifest.load(root)
    if not manifest.params.get("parts"):
        raise ValueError(
            f"the FaceShapes dataset at {str(root)!r} was generated without parts (no masks or "
            f"landmarks); generate one with `python -m flip.data.faceshapes.generate --root DIR --parts`"
        )
    wanted = {*IMAGE_EXTENSIONS, METADATA_MEMBER, PARTS_MEMBER}
    blobs, masks, keys, points = [], [], [], []
    for url in manifest.urls(split):
        for key, sample in iter_tar_samples(url, wanted=wanted):
            image = pick(sample, IMAGE_EXTENSIONS)
            if image is None or PARTS_MEMBER not in sample or METADATA_MEMBER not in sample:
                raise ValueError(f"{url}: sample {key!r} lacks its image, {PARTS_MEMBER} or .json")
            marks = decode_json(sample[METADATA_MEMBER])["landmarks"]
            blobs.append(image)
            masks.append(sample[PARTS_MEMBER])
            keys.append(key)
            points.append([marks[name] for name in POINTS])
    xy = np.asarray(points, dtype=np.float64).reshape(len(keys), len(POINTS), 2)
    if task == PARSING:
        dense = DenseLabels(PARSING, PART_CLASSES, masks=EncodedMasks(tuple(masks), tuple(keys)))
    else:
        norms = interocular(xy, POINTS.index("left_eye"), POINTS.index("right_eye"))
        dense = DenseLabels(LANDMARKS, POINTS, points=xy, norms=norms, normaliser="eye centres")
    return LabelledSplit(
        benchmark=f"faceshapes_{task}",
        split=split,
        task=task,
        label_names=list(dense.names),
        targets=np.zeros((len(keys), 0), dtype=np.int8),
        images=EncodedImages(tuple(blobs), tuple(keys)),
        keys=keys,
        dense=dense,
    )
