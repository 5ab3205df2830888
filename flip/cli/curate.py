"""`flip-data curate`: its flags, and the call into `flip.curation` (docs/data.md, "Curating shards").

The other subcommands are in `flip.cli.data`, which adds this one to its parser; torch and the
scoring model are imported only when `curate` runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flip.curation.agreement import Scorer
    from flip.prepare.parts import Part

__all__ = ["add_curate_parser", "run_curate"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def add_curate_parser(commands) -> argparse.ArgumentParser:
    """`flip-data curate` and its flags, grouped as docs/data.md explains them (`flip.cli.data`
    adds `--num-parts N --part K`, as to every flip-data command)."""
    curate = commands.add_parser(
        "curate", help="curated shards from shards: duplicates, caption rules, agreement, balancing"
    )
    add = curate.add_argument
    add("inputs", type=Path, nargs="+", metavar="IN", help="shard files or folders of .tar shards")
    add("--output", "-o", type=Path, required=True, help="folder for the curated shards")
    add("--samples-per-shard", type=_positive, default=1000, help="items per shard (default 1000)")
    add(
        "--workers",
        type=_positive,
        default=max(1, os.cpu_count() or 1),
        help="processes (default: all cores)",
    )
    add("--seed", type=int, default=0, help="seed of balancing's draws")
    add(
        "--max-pixels",
        type=int,
        default=89_478_485,
        help="skip images with more pixels (decompression bombs)",
    )
    add("--no-progress", action="store_true", help="no progress bar")

    add = curate.add_argument_group("duplicates").add_argument
    add("--dedup", choices=("none", "exact", "near"), default="near",
        help="near (default): same pixels or perceptual hash; exact: same pixels only")  # fmt: skip
    add("--dedup-on", choices=("image", "pair"), default="image",
        help="image: one copy per image, whatever its caption; pair: one per (image, caption)")  # fmt: skip
    add("--hash", choices=("phash", "dhash"), default="phash", help="perceptual hash (default phash)")
    add(
        "--max-hash-distance",
        type=int,
        default=8,
        help="near: at most this many bits of 64 apart (default 8)",
    )
    add("--min-embedding-cosine", type=float, default=None,
        help="also drop images at least this close to a kept one in the model's embedding")  # fmt: skip

    group = curate.add_argument_group("model: image-text agreement")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="a FLIP checkpoint (.ckpt) or export folder")
    which.add_argument("--open-clip", metavar="ARCH", default=None, help="an open_clip architecture instead")
    group.add_argument(
        "--pretrained", default=None, help="with --open-clip: a pretrained tag or weights file"
    )
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    group.add_argument("--batch-size", type=_positive, default=64, help="images per forward pass")
    keep = group.add_mutually_exclusive_group()
    keep.add_argument("--min-agreement", type=float, default=None, help="keep pairs whose cosine is >= this")
    keep.add_argument(
        "--keep-top-fraction", type=_fraction, default=None, help="keep the best-scored fraction"
    )

    add = curate.add_argument_group("caption rules").add_argument
    add("--min-words", type=int, default=1, help="default 1")
    add("--max-words", type=int, default=None, help="default: no limit")
    add("--min-chars", type=int, default=1, help="default 1")
    add("--max-chars", type=int, default=None, help="default: no limit")
    add("--min-letter-fraction", type=float, default=0.5, help="letters / non-space characters (default 0.5)")
    add("--max-repeat", type=int, default=5, help="longest run of one character (default 5; 0: no limit)")
    add("--allow-urls", action="store_true", help="keep captions holding URLs, web or e-mail addresses")

    add = curate.add_argument_group("balancing (MetaCLIP-style)").add_argument
    add("--entries", type=Path, default=None, help="one entry per line, '|' between phrasings of one entry")
    add("--max-per-entry", type=_positive, default=None, help="samples any one entry may contribute")
    add("--balance", choices=("cap", "metaclip"), default="cap",
        help="cap (default): a strict seeded cap; metaclip: MetaCLIP's sampling probabilities")  # fmt: skip
    add("--unmatched", choices=("keep", "drop"), default="keep", help="captions matching no entry (keep)")
    return curate


def run_curate(args: argparse.Namespace, part: Part | None = None) -> dict:
    """Runs `flip-data curate` (torch and the model are imported only for this subcommand):
    report.json's content, or with `part` one part of several, what the part scanned."""
    from flip.curation.run import CurateConfig, curate
    from flip.curation.select import Filters
    from flip.prepare.caption_rules import CaptionRules
    from flip.prepare.parts import WHOLE

    rules = CaptionRules(
        args.min_words, args.max_words, args.min_chars, args.max_chars,
        args.min_letter_fraction, args.max_repeat or None, args.allow_urls,
    )  # fmt: skip
    filters = Filters(
        rules, args.dedup, args.dedup_on, args.hash, args.max_hash_distance, args.min_embedding_cosine,
        args.min_agreement, args.keep_top_fraction, args.max_per_entry, args.balance,
        args.unmatched == "keep", args.seed,
    )  # fmt: skip
    config = CurateConfig(
        tuple(args.inputs), args.output, filters, args.entries, args.samples_per_shard, args.workers,
        args.max_pixels, not args.no_progress, part or WHOLE,
    )  # fmt: skip
    scorer = None
    if args.model is not None or args.open_clip is not None:
        from flip.curation.agreement import load_scorer

        def scorer() -> Scorer:  # loaded once the inputs are known to be good
            return load_scorer(
                args.model, args.open_clip, args.pretrained, args.device, args.batch_size,
                keep_features=args.min_embedding_cosine is not None,
            )  # fmt: skip

    result = curate(config, scorer)
    return result["report"] if config.part.whole else result["scan"]
