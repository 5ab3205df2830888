"""`flip-query`: zero-shot questions about face images from the command line.

    flip-query --ckpt CKPT --attributes eyeglasses smiling -- photos/ face.jpg
    flip-query --ckpt CKPT --choices happy sad angry -- photos/
    flip-query --format farl --path FaRL-Base-Patch16-LAIONFace20M-ep64.pth --attributes smiling -- photos/

The model is a FLIP checkpoint (--ckpt) or a baseline, named as in `baseline.*` of the eval
scripts (--format, --path, --name, --pretrained, --text-model; --open-clip ARCH is --format open_clip
--name ARCH).

Prints one JSON line per input image on stdout, in input order (folders are searched
recursively for images, sorted): `{"image": PATH, "probabilities": {name: p, ...}}`, plus
`"answer"` for --choices. An image that cannot be answered (missing, unreadable, not an image,
truncated, corrupt, a decompression bomb; a folder without images) gets its own line
`{"image": PATH, "error": REASON}` and every other image is still answered.

Exit status: 0 every image answered; 1 some images failed (their lines say why, stderr counts
them); 2 nothing asked: the question or the model is wrong (a message on stderr).
Images are read in batches by loader workers; the progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from flip.data.shards import is_image_file


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Files as given; folders replaced by the image files under them (recursive, sorted).

    A path that does not exist, or a folder without images, stays in the list as itself: the
    loader reports it on its own line like any other image it cannot read.
    """
    out = []
    for item in paths:
        path = Path(item)
        found = []
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_image_file(p.name) and p.is_file())
        out += [str(p) for p in found] or [item]
    return out


def _collate(batch: list) -> list:
    return batch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flip-query",
        description="Zero-shot attribute questions about face images; one JSON line per image on stdout.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="a FLIP checkpoint (.ckpt from train.py) or exported model folder")
    model.add_argument("--open-clip", metavar="ARCH", help="an open_clip architecture instead (a baseline)")
    model.add_argument(
        "--format",
        help="a published model instead (farl, hf, flip_base, open_clip; with --path, docs/models.md)",
    )
    parser.add_argument("--pretrained", help="with --open-clip: a pretrained tag or local weights file")
    parser.add_argument("--path", help="with --format: the weights file or folder")
    parser.add_argument("--name", help="with --format open_clip: the architecture")
    parser.add_argument("--text-model", help="with --format flip_base: its BERT config + tokenizer")
    question = parser.add_mutually_exclusive_group(required=True)
    question.add_argument("--attributes", nargs="+", metavar="NAME", help="yes/no attributes: P(present)")
    question.add_argument("--choices", nargs="+", metavar="NAME", help="answers of one multi-class question")
    parser.add_argument(
        "--prompts",
        help="YAML of phrases per name (attribute: {positive: [...], negative: [...]}; choice: [...]) "
        "and optionally `templates: [...]` with a '{}' placeholder",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="image loader processes (0: read in this one)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (after --)")
    return parser


def _load_model(args: argparse.Namespace, device: torch.device):
    if args.ckpt:
        import flip

        return flip.load(args.ckpt, device=device)
    from flip.models.baselines import load_baseline

    spec = {"format": args.format or "open_clip", "name": args.open_clip or args.name,
            "pretrained": args.pretrained, "path": args.path, "text_model": args.text_model}  # fmt: skip
    return load_baseline(spec).model.to(device).eval()


def _prompts(path: str | None) -> tuple[dict | None, list[str] | None]:
    if path is None:
        return None, None
    from omegaconf import OmegaConf

    from flip.config import plain

    data = plain(OmegaConf.load(path))
    if not isinstance(data, dict):
        raise ValueError(f"--prompts {path!r} must be a YAML mapping of name -> phrases")
    templates = data.pop("templates", None)
    return data, templates


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        raise SystemExit(f"--batch-size={args.batch_size} must be >= 1 and --workers={args.workers} >= 0")
    from flip.evaluation.attribute_query import AttributeQuery, ImageItems, check_question
    from flip.evaluation.features import resolve_device

    check_question(args.attributes, args.choices)  # before loading anything
    paths = expand_paths(args.paths)
    device = resolve_device(args.device)
    model = _load_model(args, device)
    prompts, templates = _prompts(args.prompts)
    question = AttributeQuery(model, args.attributes, args.choices, prompts, templates)
    loader = DataLoader(
        ImageItems(paths, model.preprocess),
        batch_size=args.batch_size,
        num_workers=min(args.workers, max(0, len(paths) // args.batch_size)),
        collate_fn=_collate,
    )
    failed = 0
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task("querying", total=len(paths))
        for batch in loader:
            for (index, _, error), probs in zip(batch, question.answer(batch), strict=True):
                record: dict = {"image": paths[index]}
                if error is not None:
                    record["error"] = error
                    failed += 1
                else:
                    p = probs.tolist()
                    record["probabilities"] = {n: round(v, 6) for n, v in zip(question.names, p, strict=True)}
                    if question.multiclass:
                        record["answer"] = question.names[max(range(len(p)), key=p.__getitem__)]
                sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
            progress.advance(task, len(batch))
    if failed:
        print(
            f"flip-query: {failed} of {len(paths)} images could not be answered (see their lines)",
            file=sys.stderr,
        )
    return 1 if failed else 0


def cli() -> None:
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:  # a bad model or question: a message, not a traceback
        print(f"flip-query: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
