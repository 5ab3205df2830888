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

    .venv/bin/python bench/loader_throughput.py                   # web (512 -> 224 px) and demo (64 px)
    .venv/bin/python bench/loader_throughput.py --cases demo --workers 8 --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
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

from bench.results_io import machine, write_results  # noqa: E402
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


# stored px, model px, batch, tokenizer context: web-face JPEGs stored larger than a ViT-B/16's input,
# and the demo's FaceShapes shards at the demo model's input (conf/data/faceshapes.yaml, conf/model/tiny.yaml)
CASES = {
    "web": {"image_size": 512, "model_size": 224, "batch_size": 64, "context_length": 77},
    "web256": {"image_size": 256, "model_size": 224, "batch_size": 64, "context_length": 77},
    "demo": {"image_size": 64, "model_size": 64, "batch_size": 128, "context_length": 48},
}


def run_case(name: str, args) -> dict:
    """Alternating rounds of both loaders on one case's shards; medians and paired ratios."""
    case = SimpleNamespace(**vars(args), **CASES[name])
    case.samples_per_round = case.batch_size * (case.warmup + case.batches + 2 * max(1, case.workers))
    cache = args.cache / f"{case.image_size}px-{case.shards}x{case.per_shard}"
    urls = write_shards(cache, case.shards, case.per_shard, case.image_size)
    preprocess = open_clip.image_transform(case.model_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=case.context_length)
    runs: dict[str, list[float]] = {"flip": [], "open_clip": []}
    makers = {
        "flip": lambda: flip_loader(urls, preprocess, tokenizer, case),
        "open_clip": lambda: open_clip_loader(urls, preprocess, tokenizer, case),
    }
    for round_ in range(case.rounds):
        order = ("flip", "open_clip") if round_ % 2 == 0 else ("open_clip", "flip")
        for side in order:
            runs[side].append(measure(makers[side], case))
            rate = runs[side][-1]
            print(f"{name} round {round_ + 1}/{case.rounds} {side:9s} {rate:8.1f} samples/s", flush=True)
    flip_rate, oc_rate = statistics.median(runs["flip"]), statistics.median(runs["open_clip"])
    # the two loaders of one round ran back to back, under about the same machine load
    paired = [f / o for f, o in zip(runs["flip"], runs["open_clip"], strict=True)]
    return {
        "flip_samples_per_s": round(flip_rate, 1),
        "open_clip_samples_per_s": round(oc_rate, 1),
        "ratio": round(flip_rate / oc_rate, 3),
        "paired_ratios": [round(r, 3) for r in paired],
        "median_paired_ratio": round(statistics.median(paired), 3),
        "rounds": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
        "settings": {
            "workers": case.workers,
            "batch_size": case.batch_size,
            "model_size": case.model_size,
            "stored_image_size": case.image_size,
            "shards": case.shards,
            "samples_per_shard": case.per_shard,
            "shuffle_buffer": case.shuffle_buffer,
            "warmup_batches": case.warmup,
            "timed_batches": case.batches,
            "transform": f"open_clip.image_transform({case.model_size}, is_train=True)",
            "tokenizer": f"open_clip ViT-B-16, context {case.context_length}",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["web", "demo"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "flip-bench-loader")
    parser.add_argument("--out", type=Path, default=RESULTS / "loader_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    cases = {name: run_case(name, args) for name in args.cases}
    result = {
        **{f"ratio_{name}": case["median_paired_ratio"] for name, case in cases.items()},
        "cases": cases,
        "machine": machine(open_clip=open_clip.__version__),
    }
    table = [
        "| case | workers | batch | stored px | model px | FLIP samples/s | open_clip samples/s "
        "| ratio of medians | paired ratios (min / median / max) |",
        "|---|--------:|------:|----------:|---------:|---------------:|--------------------:|------:"
        "|:---------------------------------:|",
    ]
    for name, case in cases.items():
        settings, paired = case["settings"], case["paired_ratios"]
        flip_rate, oc_rate = case["flip_samples_per_s"], case["open_clip_samples_per_s"]
        table.append(
            f"| {name} | {settings['workers']} | {settings['batch_size']} | {settings['stored_image_size']} "
            f"| {settings['model_size']} | {flip_rate:.1f} | {oc_rate:.1f} | {case['ratio']:.3f} "
            f"| {min(paired):.2f} / {statistics.median(paired):.2f} / {max(paired):.2f} |"
        )
    note = (
        f"\nMedians of {args.rounds} alternating rounds per case ({args.batches} timed batches each, after "
        f"{args.warmup} discarded), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"open_clip {open_clip.__version__}. Per-round numbers are in loader_throughput.json.\n"
    )
    write_results(args.out, result, "\n".join(table) + "\n" + note)
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio_")}))


if __name__ == "__main__":
    main()
