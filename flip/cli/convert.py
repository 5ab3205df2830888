"""`flip-convert`: a published model (FaRL, OpenAI/open_clip, FLIP-Base) as a FLIP or open_clip folder.

    flip-convert --format farl --path FaRL-Base-Patch16-LAIONFace20M-ep64.pth --to flip --out farl_ep64
    flip-convert --format flip_base --path FLIP-Base.pth --text-model bert-base-uncased --to flip --out fb
    flip-convert --format hf --path clip-vit-base-patch16 --to open_clip --out clip_b16

The model is given as everywhere else (flip.models.baselines: `--format`, `--name`, `--pretrained`,
`--path`, `--text-model`) and written by flip-export's writers: `--to flip` is FLIP's safetensors
folder (flip.load), `--to open_clip` a folder open_clip loads as `local-dir:`, checked by loading it
back. A separate command rather than `flip-export --from`: flip-export's one input is a FLIP
checkpoint, a baseline takes several fields and reports the tensors it ignored.

A Hugging Face `CLIPModel` folder is rewritten as open_clip's OpenAI-layout CLIP
(flip.models.baselines.hf_to_open_clip): same weights, but open_clip's tokenizer and transform
instead of the HF tokenizer and processor. What cannot be written: a SigLIP folder (open_clip's
SigLIP towers have another, timm-based layout; `baseline.format=hf` evaluates it as it is), a CLIP
config the mapping cannot express, and FLIP-Base as an open_clip folder (its BERT tower is built
from the Hugging Face hub, see flip.export.open_clip_format). Each fails naming why; exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

TARGETS = {"flip": "safetensors", "open_clip": "open_clip"}


def parser() -> argparse.ArgumentParser:
    from flip.models.baselines import FORMATS

    p = argparse.ArgumentParser(
        prog="flip-convert",
        description="Write a published model as a FLIP checkpoint (flip.load) or an open_clip folder. "
        "Formats: " + "; ".join(f"{name}: {text}" for name, text in FORMATS.items()),
    )
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="how the model is stored")
    p.add_argument("--path", help="the weights file or folder (farl, hf, flip_base)")
    p.add_argument("--name", help="open_clip: the architecture, or local-dir:DIR / hf-hub:ORG/NAME")
    p.add_argument("--pretrained", help="open_clip: a pretrained tag or a local weights file")
    p.add_argument(
        "--text-model", help="flip_base: its BERT's config + tokenizer (default bert-base-uncased)"
    )
    p.add_argument("--cache-dir", help="open_clip: where downloaded weights are cached")
    p.add_argument(
        "--to", required=True, choices=sorted(TARGETS), help="flip: FLIP checkpoint folder; open_clip"
    )
    p.add_argument("--out", required=True, help="folder to create (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export at --out")
    return p


def convert(spec: dict, to: str, out: str, overwrite: bool = False) -> dict:
    """Load the baseline `spec` and write it to `out` as `to`; the export report plus `ignored`."""
    from flip.export import export
    from flip.models.baselines import load_baseline
    from flip.models.baselines.hf import HFFlipModel

    if to not in TARGETS:
        raise ValueError(f"unknown --to {to!r}; choose one of {', '.join(TARGETS)}")
    loaded = load_baseline(spec)
    model = loaded.model
    if isinstance(model, HFFlipModel):
        from flip.models.baselines.hf_to_open_clip import hf_clip_to_open_clip

        towers = model.clip.model
        model = hf_clip_to_open_clip(
            towers, model.tokenizer.tokenizer, model.preprocess.processor, str(loaded.spec.path)
        )
    report = export(model, out, TARGETS[to], overwrite=overwrite)
    return {**report, "ignored": loaded.ignored}


def main(argv: Sequence[str] | None = None) -> int:
    from flip.export import OpenClipExportError

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="flip-convert: %(message)s", stream=sys.stderr)
    spec = {"format": args.format, "path": args.path, "name": args.name, "pretrained": args.pretrained,
            "text_model": args.text_model, "cache_dir": args.cache_dir}  # fmt: skip
    try:
        report = convert(spec, args.to, args.out, overwrite=args.overwrite)
    except (OpenClipExportError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"flip-convert: error: {err}", file=sys.stderr)
        return 2
    print(f"flip-convert: wrote {', '.join(report['files'])} to {args.out}")
    if report["ignored"]:
        ignored = report["ignored"]
        print(f"flip-convert: ignored {len(ignored)} tensor(s) of the file: {', '.join(ignored)}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
