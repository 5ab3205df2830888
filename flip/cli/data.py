"""`flip-data`: turn image collections into (image, caption) webdataset shards for training.

    flip-data folder IMAGES --captions captions.csv --output shards/
    flip-data facecaption15m --parquet FaceCaption-v1.parquet --images laion-face/ --output shards/
    flip-data celeba CELEBA_ROOT --split train --output shards/
    flip-data curate shards/ --output curated/ --model last.ckpt --keep-top-fraction 0.9

Every subcommand writes `NNNNN.tar` shards (`{key}.jpg`, `{key}.txt`, `{key}.json`) with a
`NNNNN_stats.json` beside each and a `report.json` counting what was skipped and why. It
runs on `--workers` processes, resumes where a killed run stopped, and writes the same bytes
for the same inputs and `--seed`. Data preparation is a one-off batch job, so it takes plain
flags rather than the Hydra configs of training and evaluation.

Inputs are checked before the output folder is touched. Exit codes: 0 done; 1 the run
failed (a worker died: rerun to resume; nothing was written; a file could not be written);
2 bad inputs or flags, or the output folder is busy or not writable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from flip.cli.curate import add_curate_parser, run_curate
from flip.data.workers import WorkerDied
from flip.locking import FolderBusyError
from flip.prepare.detect import CASCADES, HaarFaceDetector
from flip.prepare.hygiene import HygieneConfig
from flip.prepare.writer import JobConfig, OutputFolderError, Source, run_job

__all__ = ["build_parser", "main"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _common(parser: argparse.ArgumentParser, detection: bool) -> None:
    parser.add_argument(
        "--output", "-o", type=Path, required=True, help="folder for the shards and report.json"
    )
    parser.add_argument(
        "--samples-per-shard", type=_positive, default=1000, help="items per shard (default 1000)"
    )
    parser.add_argument(
        "--workers",
        type=_positive,
        default=max(1, os.cpu_count() or 1),
        help="processes (default: all cores)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of anything random (CelebA captions)")
    parser.add_argument(
        "--jpeg-quality", type=int, default=95, help="JPEG quality of re-encoded images (1-100)"
    )
    parser.add_argument(
        "--resize-short-side",
        type=int,
        default=None,
        help="shrink images whose short side is larger (never enlarges)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=89_478_485,
        help="skip images with more pixels than this as decompression bombs (default: PIL's limit)",
    )
    parser.add_argument(
        "--face-margin", type=float, default=0.2, help="crop margin around a face, x box size"
    )
    parser.add_argument(
        "--no-square-crop",
        action="store_true",
        help="keep the face crop's aspect instead of a square around it",
    )
    parser.add_argument(
        "--min-face-size", type=int, default=0, help="skip faces whose box is smaller (pixels)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if detection:
        parser.add_argument(
            "--detect-faces",
            action="store_true",
            help="crop the largest face found by OpenCV's bundled Haar cascade; images with none are skipped",
        )
        parser.add_argument(
            "--cascade", choices=sorted(CASCADES), default="default", help="which Haar cascade"
        )
        parser.add_argument(
            "--min-neighbors",
            type=int,
            default=4,
            help="Haar detections needed to accept a face (higher: stricter)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flip-data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{folder,facecaption15m,celeba,curate}"
    )

    folder = commands.add_parser(
        "folder", help="a folder of images + a captions table (csv, tsv, jsonl, parquet)"
    )
    folder.add_argument("images", type=Path, help="folder of images; paths in the table are relative to it")
    folder.add_argument(
        "--captions",
        type=Path,
        default=None,
        help="captions table (default: metadata.{jsonl,csv,tsv,parquet} in IMAGES)",
    )
    folder.add_argument(
        "--image-column", default=None, help="default: first of file_name, image, filename, path"
    )
    folder.add_argument("--caption-column", default=None, help="default: first of caption, text, captions")
    folder.add_argument(
        "--key-column", default=None, help="sample keys from this column (default: from the path)"
    )
    folder.add_argument(
        "--multi-caption",
        choices=("each", "first"),
        default="each",
        help="an image with several captions: one sample per caption (each) or one sample (first)",
    )
    _common(folder, detection=True)

    face = commands.add_parser(
        "facecaption15m", help="FaceCaption-15M parquet + the images img2dataset fetched"
    )
    face.add_argument(
        "--parquet", type=Path, nargs="+", required=True, help="FaceCaption-15M parquet file(s)"
    )
    face.add_argument("--images", type=Path, nargs="+", required=True, help="img2dataset output folder(s)")
    face.add_argument("--url-column", default="url")
    face.add_argument("--box-column", default="face_bbox")
    face.add_argument("--caption-column", default="face_caption")
    face.add_argument("--box-format", choices=("xyxy", "xywh"), default="xyxy", help="x0,y0,x1,y1 or x,y,w,h")
    face.add_argument(
        "--resize-mode",
        choices=("auto", "border", "center_crop"),
        default="auto",
        help="img2dataset's --resize_mode when it was border or center_crop (auto: no / keep_ratio)",
    )
    _common(face, detection=False)

    celeba = commands.add_parser("celeba", help="CelebA (attributes -> captions) in its published layout")
    celeba.add_argument(
        "root", type=Path, help="CelebA folder (Anno/ Eval/ Img/, or everything in one folder)"
    )
    celeba.add_argument("--split", choices=("train", "val", "test", "all"), default="train")
    _common(celeba, detection=True)
    add_curate_parser(commands)
    return parser


def _find_captions(images: Path) -> Path:
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {str(images)!r} does not exist")
    for suffix in ("jsonl", "csv", "tsv", "parquet"):
        if (images / f"metadata.{suffix}").is_file():
            return images / f"metadata.{suffix}"
    raise FileNotFoundError(
        f"no --captions given and no metadata.jsonl/.csv/.tsv/.parquet in {str(images)!r}; "
        "name the captions table"
    )


def make_source(args: argparse.Namespace) -> Source:
    if args.command == "folder":
        from flip.prepare.sources.folder import FolderSource

        return FolderSource(
            args.images,
            args.captions or _find_captions(args.images),
            args.image_column,
            args.caption_column,
            args.key_column,
            args.multi_caption,
        )
    if args.command == "facecaption15m":
        from flip.prepare.sources.facecaption import FaceCaptionSource

        return FaceCaptionSource(
            args.parquet,
            args.images,
            args.url_column,
            args.box_column,
            args.caption_column,
            args.box_format,
            args.resize_mode,
            workers=args.workers,
        )
    from flip.prepare.sources.celeba import CelebASource

    return CelebASource(args.root, args.split, args.seed)


def make_config(args: argparse.Namespace) -> JobConfig:
    hygiene = HygieneConfig(
        jpeg_quality=args.jpeg_quality,
        resize_short_side=args.resize_short_side,
        max_pixels=args.max_pixels,
        face_margin=args.face_margin,
        square_crop=not args.no_square_crop,
        min_face_size=args.min_face_size,
    )
    detector = None
    if getattr(args, "detect_faces", False):
        detector = HaarFaceDetector(cascade=args.cascade, min_neighbors=args.min_neighbors)
        detector.load()  # fail here, not in a worker, if OpenCV or its cascade is missing
    return JobConfig(
        args.output, args.samples_per_shard, args.workers, hygiene, detector, not args.no_progress
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prefix = f"flip-data {args.command}: error:"
    try:
        if args.command == "curate":
            report = run_curate(args)
        else:
            report = run_job(make_source(args), make_config(args))
    except (FileNotFoundError, ValueError, FolderBusyError, OutputFolderError) as exc:
        parser.exit(2, f"{prefix} {exc}\n")
    except WorkerDied as exc:
        parser.exit(1, f"{prefix} {exc}\n")
    except OSError as exc:  # e.g. the disk filled up while writing a shard
        where = f" {exc.filename!r}" if exc.filename else ""
        parser.exit(1, f"{prefix} could not write{where}: {exc.strerror or exc}\n")
    report_path = Path(report["output"]) / "report.json"
    summary = {k: report[k] for k in ("samples", "skipped_by_reason", "shards_written", "shards_resumed")}
    print(json.dumps({"report": str(report_path), **summary}, indent=2))
    if report["samples"]["written"] == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in report["skipped_by_reason"].items()) or "no input records"
        parser.exit(1, f"{prefix} no sample was written ({reasons}); see {str(report_path)!r} for examples\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
