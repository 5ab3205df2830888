"""Samples/s of FLIP's training data pipeline vs open_clip's, on the same shards, transforms and workers.

Baseline: `open_clip_train.data.get_wds_dataset` (open_clip's own trainer, shipped inside
open_clip_torch), with resampled shards as FLIP uses them (`--dataset-resampled`). Both
loaders read the same webdataset shards of face images, apply the same open_clip
training transform (RandomResizedCrop to the model size, normalise) and tokenizer, use the
same batch size, shuffle buffer (size and initial fill) and number of loader worker
processes. Rounds alternate
(FLIP, open_clip, FLIP, ...) so that load from other processes on the machine hits both
alike; each round builds a fresh loader, discards the first batches (worker start-up and
shuffle-buffer fill) and times the next ones. The medians over rounds are reported.

    .venv/bin/python bench/loader_throughput.py                   # 2 workers, batch 64, 224 px
    .venv/bin/python bench/loader_throughput.py --workers 8 --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402
import torch  # noqa: E402
from webdataset import TarWriter  # noqa: E402
from webdataset.tariterators import tar_file_expander  # noqa: E402

from flip.atomic import atomic_file  # noqa: E402
from flip.data.faceshapes.generate import make_sample  # noqa: E402
from flip.data.pipeline import EpochSeed, SampleTransform, make_loader, train_pipeline  # noqa: E402
from flip.data.shards import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, split_member_name  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def write_shards(folder: Path, shards: int, per_shard: int, image_size: int) -> list[str]:
    """FaceShapes faces as img2dataset-style shards ({key}.jpg/.txt/.json); reused when present."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard in range(shards):
        path = folder / f"{shard:05d}.tar"
        urls.append(str(path))
        if path.is_file():
            continue
        with atomic_file(path, "wb") as stream, TarWriter(stream, encoder=False) as sink:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                sink.write(make_sample("bench", index, seed=0, image_size=image_size))
    return urls


def flip_loader(urls, preprocess, tokenizer, args):
    pipeline, batches = train_pipeline(
        urls,
        SampleTransform(preprocess, tokenizer),
        batch_size=args.batch_size,
        samples_per_epoch=args.samples_per_round,
        world_size=1,
        num_workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
        seed=0,
        epoch_seed=EpochSeed(),
    )
    return make_loader(pipeline, args.workers, batches)


def image_or_caption(name: str) -> bool:
    """Whether a tar member is one open_clip's baseline needs: its pipeline decodes with webdataset's
    default handlers, which unpickle `.pyd`/`.pickle` and `torch.load` `.pth` members, so no other
    member may reach it (the shards are cached in a shared temp folder and reused)."""
    parts = split_member_name(name)
    return parts is not None and parts[1] in (*IMAGE_EXTENSIONS, *CAPTION_EXTENSIONS)


def open_clip_loader(urls, preprocess, tokenizer, args):
    from open_clip_train import data as oc_data

    # the same shuffle buffer as FLIP's, filled to the same level before the first sample
    oc_data._SAMPLE_SHUFFLE_SIZE = args.shuffle_buffer
    oc_data._SAMPLE_SHUFFLE_INITIAL = min(args.shuffle_buffer, 4 * args.batch_size)
    # open_clip 3.3 + webdataset >= 0.2.96 crash on the {} end-of-shard marker (KeyError 'fname',
    # open_clip issue #935); the maintainers' fix is eof_value=None, applied here
    oc_data.tar_file_expander = functools.partial(
        tar_file_expander, eof_value=None, select_files=image_or_caption
    )
    oc_args = SimpleNamespace(
        train_data="::".join(urls),
        train_num_samples=args.samples_per_round,
        dataset_resampled=True,
        seed=0,
        batch_size=args.batch_size,
        workers=args.workers,
        world_size=1,
        train_data_upsampling_factors=None,
    )
    return oc_data.get_wds_dataset(
        oc_args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer
    ).dataloader


def measure(make, args) -> float:
    """Samples/s over `args.batches` batches after `args.warmup` discarded ones, fresh loader."""
    loader = make()
    iterator = iter(loader)
    for _ in range(args.warmup):
        images, _ = next(iterator)
    start = time.perf_counter()
    seen = 0
    for _ in range(args.batches):
        images, text = next(iterator)
        seen += images.shape[0]
    elapsed = time.perf_counter() - start
    assert images.shape == (args.batch_size, 3, args.model_size, args.model_size) and text.dtype == torch.long
    del iterator, loader
    return seen / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model-size", type=int, default=224, help="transform output size (ViT-B/16: 224)")
    parser.add_argument("--image-size", type=int, default=256, help="stored image size")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "flip-bench-loader")
    parser.add_argument("--out", type=Path, default=RESULTS / "loader_throughput.json")
    args = parser.parse_args()
    args.samples_per_round = args.batch_size * (args.warmup + args.batches + 2 * max(1, args.workers))

    torch.set_num_threads(1)
    cache = args.cache / f"{args.image_size}px-{args.shards}x{args.per_shard}"
    urls = write_shards(cache, args.shards, args.per_shard, args.image_size)
    preprocess = open_clip.image_transform(args.model_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")

    runs: dict[str, list[float]] = {"flip": [], "open_clip": []}
    makers = {
        "flip": lambda: flip_loader(urls, preprocess, tokenizer, args),
        "open_clip": lambda: open_clip_loader(urls, preprocess, tokenizer, args),
    }
    for round_ in range(args.rounds):
        order = ("flip", "open_clip") if round_ % 2 == 0 else ("open_clip", "flip")
        for name in order:
            runs[name].append(measure(makers[name], args))
            print(f"round {round_ + 1}/{args.rounds} {name:9s} {runs[name][-1]:8.1f} samples/s", flush=True)

    flip_rate, oc_rate = statistics.median(runs["flip"]), statistics.median(runs["open_clip"])
    paired = [f / o for f, o in zip(runs["flip"], runs["open_clip"], strict=True)]
    result = {
        "flip_samples_per_s": round(flip_rate, 1),
        "open_clip_samples_per_s": round(oc_rate, 1),
        "ratio": round(flip_rate / oc_rate, 3),
        # the two loaders of one round ran back to back, under about the same machine load
        "paired_ratios": [round(r, 3) for r in paired],
        "median_paired_ratio": round(statistics.median(paired), 3),
        "rounds": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
        "settings": {
            "workers": args.workers,
            "batch_size": args.batch_size,
            "model_size": args.model_size,
            "stored_image_size": args.image_size,
            "shards": args.shards,
            "samples_per_shard": args.per_shard,
            "shuffle_buffer": args.shuffle_buffer,
            "warmup_batches": args.warmup,
            "timed_batches": args.batches,
            "transform": "open_clip.image_transform(is_train=True)",
            "tokenizer": "open_clip ViT-B-16",
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = [
        "| workers | batch | stored px | model px | FLIP samples/s | open_clip samples/s | ratio "
        "| paired ratios (min / median / max) |",
        "|--------:|------:|----------:|---------:|---------------:|--------------------:|------:"
        "|:---------------------------------:|",
        f"| {args.workers} | {args.batch_size} | {args.image_size} | {args.model_size} | {flip_rate:.1f} "
        f"| {oc_rate:.1f} | {flip_rate / oc_rate:.3f} "
        f"| {min(paired):.2f} / {statistics.median(paired):.2f} / {max(paired):.2f} |",
    ]
    note = (
        f"\nMedians of {args.rounds} alternating rounds ({args.batches} timed batches each, after "
        f"{args.warmup} discarded), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"open_clip {open_clip.__version__}. Per-round numbers are in loader_throughput.json.\n"
    )
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n" + note)
    print(json.dumps({k: result[k] for k in ("flip_samples_per_s", "open_clip_samples_per_s", "ratio")}))


if __name__ == "__main__":
    main()
