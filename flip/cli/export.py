"""`flip-export`: write a trained model as an open_clip folder, ONNX graphs or safetensors.

A small tool with three flags, so argparse rather than a Hydra config:

    flip-export --ckpt logs/train/runs/<date>/checkpoints/last.ckpt --format open_clip --out exports/oc
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from flip.checkpoint import ACCEPTED
from flip.export import FORMATS, OnnxCheckError, OpenClipExportError, export

HELP = {
    "open_clip": "open_clip_config.json + open_clip_model.safetensors, for "
    "open_clip.create_model_and_transforms('local-dir:OUT') and open_clip.get_tokenizer('local-dir:OUT')",
    "onnx": "image_encoder.onnx + text_encoder.onnx (dynamic batch) + onnx_config.json, "
    "checked against PyTorch with onnxruntime",
    "safetensors": "model.safetensors + flip_config.json, for flip.load(OUT)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flip-export",
        description="Export a trained FLIP model. Formats: "
        + "; ".join(f"{name}: {text}" for name, text in HELP.items()),
    )
    p.add_argument("--ckpt", required=True, help=f"the model: {ACCEPTED}")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, help="folder to create (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("flip-export: %(message)s"))
    package_log = logging.getLogger("flip.export")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False  # open_clip's logging.warning() gives the root logger a handler too
    print(f"flip-export: {args.ckpt} -> {args.out} ({args.format})", file=sys.stderr)
    try:
        return _run(args)
    finally:
        package_log.removeHandler(handler)
        package_log.propagate = True


def _run(args: argparse.Namespace) -> int:
    try:
        report = export(args.ckpt, args.out, args.format, overwrite=args.overwrite)
    except (OpenClipExportError, OnnxCheckError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"flip-export: error: {err}", file=sys.stderr)
        return 2
    print(f"flip-export: wrote {', '.join(report['files'])} to {args.out}")
    if "max_abs_difference" in report:
        worst = max(report["max_abs_difference"].values())
        print(f"flip-export: onnxruntime matches PyTorch (largest difference {worst:.1e})")
    if report.get("verified"):
        print("flip-export: open_clip loads the folder with identical weights, tokens and transforms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
