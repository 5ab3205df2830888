"""`flip-export`: write a trained model as an open_clip folder, ONNX graphs or safetensors.

A small tool with a few flags, so argparse rather than a Hydra config:

    flip-export --ckpt logs/train/runs/<date>/checkpoints/last.ckpt --format open_clip --out exports/oc

`--interpolate FINETUNED ZEROSHOT --alpha A` writes the WiSE-FT mix of two models of one
architecture instead of one model (flip.export.interpolate).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from flip.checkpoint import ACCEPTED
from flip.export import FORMATS, OnnxCheckError, OpenClipExportError, export
from flip.export.interpolate import interpolate

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
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help=f"the model: {ACCEPTED}")
    model.add_argument(
        "--interpolate",
        nargs=2,
        metavar=("FINETUNED", "ZEROSHOT"),
        help="write the WiSE-FT mix alpha * FINETUNED + (1 - alpha) * ZEROSHOT of two models of one "
        "architecture (each as --ckpt takes it: a fine-tune's <run>/model folder, the checkpoint it "
        "started from)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        help="with --interpolate: the fine-tuned model's weight, 0 to 1 (1: the fine-tuned model)",
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, help="folder to create (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if (args.alpha is None) != (args.interpolate is None):
        p.error("--alpha goes with --interpolate FINETUNED ZEROSHOT, and --interpolate needs --alpha")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("flip-export: %(message)s"))
    package_log = logging.getLogger("flip.export")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False  # open_clip's logging.warning() gives the root logger a handler too
    source = (
        args.ckpt or f"{args.alpha:g} x {args.interpolate[0]} + {1 - args.alpha:g} x {args.interpolate[1]}"
    )
    print(f"flip-export: {source} -> {args.out} ({args.format})", file=sys.stderr)
    try:
        return _run(args)
    finally:
        package_log.removeHandler(handler)
        package_log.propagate = True


def _run(args: argparse.Namespace) -> int:
    try:
        model = args.ckpt if args.interpolate is None else interpolate(*args.interpolate, args.alpha)
        report = export(model, args.out, args.format, overwrite=args.overwrite)
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
