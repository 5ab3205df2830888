"""Images/s per core of flip-data's decode + detect + align + encode, against decode + resize + encode.

What a user sizing a FaceCaption-15M job needs: how many images one core turns into aligned
faces per second, and how much that costs over decoding and re-encoding alone. Each pipeline
is flip-data's own per-shard code (`flip.prepare.samples.shard_samples`, what a worker runs
between reading a shard's items and writing its tar), on one process with one thread (torch,
OpenCV), so the figure is per core: `--workers N` on N cores runs N of them.

Inputs: web-sized photos (1024 x 768 JPEGs, quality 90) of a real face, skimage's astronaut,
scaled so the face is 180-330 px (FaceCaption-15M's mean face is 285 px), turned by up to 15
degrees and placed at random. Pipelines:

- `resize`: decode, shrink the short side to 224, encode (no detection): the baseline;
- `detect_crop`: decode, MTCNN, the face cropped with flip-data's margin, shrunk to 224, encode;
- `detect_align`: decode, MTCNN, the face aligned to the 224 px ArcFace template, encode;
- `detect_align_20px`: the same with MTCNN searching from 20 px faces instead of 64 (half the
  default --min-face-size of 128), to show what the pyramid's start costs.
- `box_align`: `flip-data facecaption15m --align`: each photo comes with its face's box (as a
  FaceCaption-15M row does), MTCNN looks for the landmarks only around it, and the face is
  aligned to the 224 px template.

Rounds alternate the pipelines; the median of the rounds is reported, with a breakdown of one
image's time by step (decode, detect, align, encode) measured on the same images.

    .venv/bin/python bench/prepare_throughput.py
    .venv/bin/python bench/prepare_throughput.py --images 16 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.results_io import machine, write_results  # noqa: E402
from flip.prepare.align import AlignConfig, align_face  # noqa: E402
from flip.prepare.detect import MtcnnFaceDetector  # noqa: E402
from flip.prepare.faces import FacePolicy  # noqa: E402
from flip.prepare.hygiene import HygieneConfig, decode_rgb, encode_jpeg  # noqa: E402
from flip.prepare.in_box import SEARCH_MIN_FACE  # noqa: E402
from flip.prepare.report import SkipLog  # noqa: E402
from flip.prepare.samples import FaceSteps, FaceTally, shard_samples  # noqa: E402
from flip.prepare.writer import ImageRef, Item  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CANVAS = (1024, 768)
FACECAPTION_FACES = 15_000_000  # FaceCaption-15M's (face, caption) rows
ASTRONAUT_FACE = (224.0, 120.0, 90.0)  # her face's centre (x, y) and width in the 512 px photo
FACE_BOX_HALF = (50.0, 62.0)  # half the width and height of a box around that face (MTCNN's: 44, 55)


def make_photos(folder: Path, count: int, seed: int) -> list[tuple[Path, tuple[float, ...]]]:
    """`count` 1024 x 768 JPEGs of the astronaut's face at 180-330 px, turned and placed at
    random, each with a box around the face a little larger than MTCNN's (as RetinaFace's are)."""
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    rng = np.random.default_rng(seed)
    paths = []
    cx, cy, width = ASTRONAUT_FACE
    for index in range(count):
        scale = rng.uniform(180, 330) / width
        angle = np.radians(rng.uniform(-15, 15))
        target = rng.uniform([250, 220], [CANVAS[0] - 250, CANVAS[1] - 220])
        # PIL's affine maps output pixels to input pixels: the inverse of face -> target
        a = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
        inverse = np.linalg.inv(a)
        offset = np.array([cx, cy]) - inverse @ target
        coefficients = (*inverse[0], offset[0], *inverse[1], offset[1])
        grey = (128, 128, 128)
        image = photo.transform(CANVAS, Image.Transform.AFFINE, coefficients, Image.BICUBIC, fillcolor=grey)
        path = folder / f"{index:04d}.jpg"
        image.save(path, quality=90)
        half = np.array(FACE_BOX_HALF) * scale
        paths.append((path, (*(target - half), *(target + half))))
    return paths


def pipelines(min_face_size: int) -> dict[str, tuple[HygieneConfig, FaceSteps]]:
    policy = FacePolicy(min_confidence=0.98, min_size=min_face_size)
    mtcnn = MtcnnFaceDetector(min_face_size=max(20, min_face_size // 2), threads=1)
    return {
        "resize": (HygieneConfig(resize_short_side=224), FaceSteps()),
        "detect_crop": (
            HygieneConfig(resize_short_side=224, min_face_size=min_face_size),
            FaceSteps(mtcnn, policy),
        ),
        "detect_align": (
            HygieneConfig(min_face_size=min_face_size),
            FaceSteps(mtcnn, policy, AlignConfig(224)),
        ),
        "detect_align_20px": (
            HygieneConfig(min_face_size=min_face_size),
            FaceSteps(MtcnnFaceDetector(min_face_size=20, threads=1), policy, AlignConfig(224)),
        ),
        "box_align": (  # flip-data facecaption15m --align: given boxes, landmarks found around them
            HygieneConfig(),
            FaceSteps(
                MtcnnFaceDetector(min_face_size=SEARCH_MIN_FACE, threads=1),
                FacePolicy(min_confidence=0.98, min_size=0),
                AlignConfig(224),
            ),
        ),
    }


def run_pipeline(items: list[Item], hygiene: HygieneConfig, steps: FaceSteps) -> tuple[float, float, int]:
    """Images per CPU second and per wall second of one pass over `items`, and the samples written.

    CPU time is the per-core figure: other jobs on a shared machine slow the wall clock, not it."""
    skips, tally = SkipLog(), FaceTally()
    cpu, wall = time.process_time(), time.perf_counter()
    written = sum(1 for _ in shard_samples(items, hygiene, steps, skips, tally))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return len(items) / cpu, len(items) / wall, written


def breakdown(paths: list[Path], min_face_size: int) -> dict[str, float]:
    """CPU milliseconds per image of each step of detect_align, one image at a time."""
    detector = MtcnnFaceDetector(min_face_size=max(20, min_face_size // 2), threads=1)
    detector.load()
    times = {"read+decode": 0.0, "detect": 0.0, "align": 0.0, "encode": 0.0}
    hygiene = HygieneConfig()
    for path, _ in paths:
        t0 = time.process_time()
        decoded = decode_rgb(path.read_bytes(), hygiene)
        t1 = time.process_time()
        faces = detector.detect(decoded.image)
        t2 = time.process_time()
        face = max(faces, key=lambda f: f.area)
        aligned = align_face(decoded.image, np.asarray(face.landmarks), AlignConfig(224))
        t3 = time.process_time()
        encode_jpeg(aligned.image, hygiene.jpeg_quality)
        t4 = time.process_time()
        for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[name] += seconds
    return {name: round(1000 * total / len(paths), 2) for name, total in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="photos per pass")
    parser.add_argument("--rounds", type=int, default=3, help="alternating passes per pipeline")
    parser.add_argument("--min-face-size", type=int, default=128, help="flip-data's --min-face-size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "prepare_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory() as folder:
        paths = make_photos(Path(folder), args.images, args.seed)
        mean_bytes = statistics.mean(p.stat().st_size for p, _ in paths)
        items = [Item(p.stem, ImageRef(str(p)), "a face") for p, _ in paths]
        boxed = [Item(p.stem, ImageRef(str(p)), "a face", {}, box) for p, box in paths]
        cases = pipelines(args.min_face_size)
        for _, steps in cases.values():
            if steps.detector is not None:
                steps.detector.load()
        run_pipeline(items[:4], *cases["detect_align"])  # warm-up: first calls allocate
        rates: dict[str, list[float]] = {name: [] for name in cases}
        wall: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(args.rounds):
            order = list(cases) if round_ % 2 == 0 else list(reversed(cases))
            for name in order:
                rate, wall_rate, written = run_pipeline(boxed if name == "box_align" else items, *cases[name])
                if written != len(items):
                    raise RuntimeError(f"{name}: {written} of {len(items)} photos gave a sample")
                rates[name].append(rate)
                wall[name].append(wall_rate)
                print(
                    f"round {round_ + 1}/{args.rounds} {name:18s} {rate:7.2f} images per CPU second "
                    f"({wall_rate:.2f} per wall second)",
                    flush=True,
                )
        steps_ms = breakdown(paths, args.min_face_size)

    median = {name: statistics.median(values) for name, values in rates.items()}
    core_hours = {name: FACECAPTION_FACES / rate / 3600 for name, rate in median.items()}
    result = {
        "images_per_s_per_core": {name: round(rate, 2) for name, rate in median.items()},
        "slowdown_vs_resize": {name: round(median["resize"] / rate, 2) for name, rate in median.items()},
        "facecaption15m_core_hours": {name: round(hours) for name, hours in core_hours.items()},
        "ms_per_image_detect_align": steps_ms,
        "rounds": {name: [round(v, 2) for v in values] for name, values in rates.items()},
        # images per wall-clock second: lower than per CPU second while other jobs share the cores
        "rounds_wall": {name: [round(v, 2) for v in values] for name, values in wall.items()},
        "settings": {
            "images": args.images,
            "canvas": list(CANVAS),
            "mean_jpeg_bytes": round(mean_bytes),
            "face_px": [180, 330],
            "min_face_size": args.min_face_size,
            "mtcnn_search_from_px": max(20, args.min_face_size // 2),
            "output_px": 224,
            "threads": 1,
        },
        "machine": machine(opencv=cv2.__version__),
    }
    table = [
        "| pipeline | images/s per core | time vs resize | core-hours for FaceCaption-15M (15M faces) |",
        "|---|---:|---:|---:|",
    ]
    for name, rate in median.items():
        table.append(f"| {name} | {rate:.2f} | {median['resize'] / rate:.1f}x | {core_hours[name]:,.0f} |")
    steps = ", ".join(f"{name} {ms:.1f} ms" for name, ms in steps_ms.items())
    note = (
        f"\nImages per CPU second (one process, one thread): medians of {args.rounds} alternating "
        f"passes over {args.images} photos of {CANVAS[0]} x {CANVAS[1]} px (JPEG, "
        f"{mean_bytes / 1024:.0f} KiB on average, faces 180-330 px), {os.cpu_count()} cores on the "
        f"machine, torch {torch.__version__}. One image of detect_align, step by step (CPU): {steps}.\n"
    )
    write_results(args.out, result, "\n".join(table) + "\n" + note)
    print(json.dumps({k: result[k] for k in ("images_per_s_per_core", "facecaption15m_core_hours")}))


if __name__ == "__main__":
    main()
