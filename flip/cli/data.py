"""`flip-data`: turn image collections into (image, caption) webdataset shards for training.

    flip-data folder IMAGES --captions captions.csv --output shards/
    flip-data facecaption15m --parquet FaceCaption-v1.parquet --images laion-face/ --output shards/
    flip-data celeba CELEBA_ROOT --split train --output shards/
    flip-data merge-report shards/    # after every part of a job run with --num-parts N --part K
    flip-data curate shards/ --output curated/ --model last.ckpt --keep-top-fraction 0.9

Every subcommand writes `NNNNN.tar` shards (`{key}.jpg`, `{key}.txt`, `{key}.json`) with a
`NNNNN_stats.json` beside each and a `report.json` counting what was skipped and why. It
runs on `--workers` processes, resumes where a killed run stopped, and writes the same bytes
for the same inputs and `--seed`. With `--num-parts N --part K` it writes only part K of the
job (the records whose key hashes to K, `flip.prepare.parts`) beside the other parts' files
in the same folder, and `merge-report` checks that every part finished and sums their
reports (`curate --part K` only scans part K's input shards into its cache; the run without
`--part` then selects and writes). Data preparation is a one-off batch job, so it takes
plain flags rather than the Hydra configs of training and evaluation.

Inputs are checked before the output folder is touched. Exit codes: 0 done; 1 the run
failed (a worker died: rerun to resume; nothing was written; a file could not be written;
merge-report: a part has not finished); 2 bad inputs or flags, or the output folder is busy
or not writable.
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
from flip.prepare.align import AlignConfig
from flip.prepare.detect import CASCADES, DETECTORS, HaarFaceDetector, MtcnnFaceDetector
from flip.prepare.faces import KEEP, FacePolicy
from flip.prepare.hygiene import HygieneConfig
from flip.prepare.in_box import SEARCH_MIN_FACE
from flip.prepare.merge import UnfinishedParts, merge_reports
from flip.prepare.parts import WHOLE, Part
from flip.prepare.samples import FaceSteps
from flip.prepare.writer import JobConfig, OutputFolderError, Source, run_job

__all__ = ["build_parser", "main"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _part_count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not accepted: give the number of parts, an integer >= 1"
        )
    return int(text)


def _part_number(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not accepted: give the part number, an integer from 0 to --num-parts - 1"
        )
    return int(text)


def add_part_options(parser: argparse.ArgumentParser, part_help: str | None = None) -> None:
    """`--num-parts N --part K`: every flip-data command takes them (`part_help`: what a part does)."""
    parser.add_argument(
        "--num-parts",
        type=_part_count,
        default=None,
        help="split the job into N parts, e.g. one per machine or array task (default: one)",
    )
    parser.add_argument(
        "--part",
        type=_part_number,
        default=None,
        help=part_help
        or "write part K (0 to N-1) only: the records whose key hashes to K; then run merge-report",
    )


def part_from_args(args: argparse.Namespace) -> Part:
    """The part the flags ask for; ValueError naming the flag, its value and what is accepted."""
    count, index = args.num_parts, args.part
    if count is None and index is None:
        return WHOLE
    if index is None:
        raise ValueError(f"--num-parts {count} needs --part K, K from 0 to {count - 1}: the part to write")
    if count is None:
        raise ValueError(f"--part {index} needs --num-parts N: how many parts the job is split into")
    return Part(index, count)


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
        "--min-face-size",
        type=int,
        default=None,
        help="skip faces whose box is smaller (pixels; default 128 with --detect-faces, else 0)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_part_options(parser)
    if detection:
        _detection(parser)


def _alignment(group: argparse._ArgumentGroup, needs: str) -> None:
    group.add_argument(
        "--align",
        action="store_true",
        help=f"warp each face onto the 5-point ArcFace template ({needs})",
    )
    group.add_argument(
        "--align-size", type=int, default=224, help="side of the aligned face in pixels (default 224)"
    )
    group.add_argument(
        "--align-padding",
        type=float,
        default=0.0,
        help="show more around the face: this fraction of the size on each side (default 0)",
    )
    group.add_argument(
        "--min-confidence",
        type=float,
        default=0.98,
        help="skip faces the detector is less sure of (default 0.98, FaceCaption-15M's; haar has none)",
    )
    group.add_argument(
        "--detect-batch-size", type=_positive, default=16, help="images per MTCNN batch (default 16)"
    )
    group.add_argument("--detect-device", default="cpu", help="torch device MTCNN runs on (cpu, cuda)")


def _detection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("face detection and alignment (docs/data.md)")
    group.add_argument(
        "--detect-faces",
        action="store_true",
        help="crop the faces a detector finds (MTCNN by default); images with none are skipped",
    )
    group.add_argument("--detector", choices=sorted(DETECTORS), default="mtcnn", help="mtcnn or haar")
    group.add_argument(
        "--faces",
        choices=KEEP,
        default="largest",
        help="largest: one sample per image; all: one per face, keyed {key}_face{i}",
    )
    _alignment(group, "needs --detect-faces, mtcnn")
    group.add_argument("--cascade", choices=sorted(CASCADES), default="default", help="haar: which cascade")
    group.add_argument(
        "--min-neighbors",
        type=int,
        default=4,
        help="haar: detections needed to accept a face (higher: stricter)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flip-data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{folder,facecaption15m,celeba,curate,merge-report}"
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
    _alignment(
        face.add_argument_group("alignment of the given boxes (docs/data.md)"),
        "MTCNN finds the landmarks around each row's box",
    )

    celeba = commands.add_parser("celeba", help="CelebA (attributes -> captions) in its published layout")
    celeba.add_argument(
        "root", type=Path, help="CelebA folder (Anno/ Eval/ Img/, or everything in one folder)"
    )
    celeba.add_argument("--split", choices=("train", "val", "test", "all"), default="train")
    _common(celeba, detection=True)
    add_part_options(
        add_curate_parser(commands),
        "scan (and score) part K's input shards (0 to N-1) into OUT/.curate only; then run without --part",
    )

    merge = commands.add_parser(
        "merge-report",
        help="check that every part of a job run with --num-parts finished; write their summed report.json",
    )
    merge.add_argument("output", type=Path, help="the --output folder the parts wrote")
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


def make_faces(args: argparse.Namespace, min_face_size: int) -> FaceSteps:
    """The detector, face policy and alignment of the detection flags."""
    if args.command == "facecaption15m" and args.align:  # the rows' boxes, aligned by MTCNN's landmarks
        detector = MtcnnFaceDetector(
            min_face_size=SEARCH_MIN_FACE, batch_size=args.detect_batch_size, device=args.detect_device
        )
    elif not getattr(args, "detect_faces", False):
        if getattr(args, "align", False):
            raise ValueError("--align needs landmarks: add --detect-faces (with --detector mtcnn)")
        return FaceSteps()
    elif args.detector == "haar":
        detector = HaarFaceDetector(cascade=args.cascade, min_neighbors=args.min_neighbors)
    else:
        # the pyramid starts at half the minimum size, so faces a little under it are still found
        # and counted as small_face, and MTCNN costs about half what it does from 20 px
        detector = MtcnnFaceDetector(
            min_face_size=max(20, min_face_size // 2),
            batch_size=args.detect_batch_size,
            device=args.detect_device,
        )
    if args.align and args.resize_short_side is not None:
        raise ValueError("--align writes --align-size faces; drop --resize-short-side")
    align = AlignConfig(args.align_size, args.align_padding) if args.align else None
    keep = getattr(args, "faces", "largest")  # a FaceCaption-15M row is one face
    faces = FaceSteps(detector, FacePolicy(args.min_confidence, min_face_size, keep), align)
    detector.check()  # fail here, not in a worker, if the detector, its weights or device are missing
    return faces


def make_config(args: argparse.Namespace, part: Part = WHOLE) -> JobConfig:
    min_face_size = args.min_face_size
    if min_face_size is None:  # FaceCaption-15M kept faces over 128 px; given boxes are the user's
        min_face_size = 128 if getattr(args, "detect_faces", False) else 0
    hygiene = HygieneConfig(
        jpeg_quality=args.jpeg_quality,
        resize_short_side=args.resize_short_side,
        max_pixels=args.max_pixels,
        face_margin=args.face_margin,
        square_crop=not args.no_square_crop,
        min_face_size=min_face_size,
    )
    faces = make_faces(args, min_face_size)
    return JobConfig(
        args.output, args.samples_per_shard, args.workers, hygiene, faces, not args.no_progress, part=part
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prefix = f"flip-data {args.command}: error:"
    part = WHOLE
    try:
        if args.command == "merge-report":
            report = merge_reports(args.output)
        elif args.command == "curate":
            part = part_from_args(args)  # before anything is read
            report = run_curate(args, part)
        else:
            part = part_from_args(args)  # before anything is read
            report = run_job(make_source(args), make_config(args, part))
    except (FileNotFoundError, FileExistsError, ValueError, FolderBusyError, OutputFolderError) as exc:
        parser.exit(2, f"{prefix} {exc}\n")
    except (WorkerDied, UnfinishedParts) as exc:
        parser.exit(1, f"{prefix} {exc}\n")
    except OSError as exc:  # e.g. the disk filled up while writing a shard
        where = f" {exc.filename!r}" if exc.filename else ""
        parser.exit(1, f"{prefix} could not write{where}: {exc.strerror or exc}\n")
    if args.command == "curate" and not part.whole:
        print(json.dumps(report, indent=2))  # what the part scanned; the run without --part writes
        return 0
    report_path = Path(report["output"]) / part.report_name
    summary = {k: report[k] for k in ("samples", "skipped_by_reason", "shards_written", "shards_resumed")}
    print(json.dumps({"report": str(report_path), **summary}, indent=2))
    if not part.whole and report["samples"]["items"] == report["samples"]["skipped"] == 0:
        return 0  # a part may own no record at all (more parts than records); merge-report judges the job
    if report["samples"]["written"] == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in report["skipped_by_reason"].items()) or "no input records"
        parser.exit(1, f"{prefix} no sample was written ({reasons}); see {str(report_path)!r} for examples\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
