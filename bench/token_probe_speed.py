"""Token-probe speed: FLIP's token probe vs a plain PyTorch loop on the same cached vectors.

CelebA-sized synthetic cached vectors: 160,000 training and 20,000 test images x 12 vectors
(4 blocks x class token, mean, max) x 768 (a ViT-B/16's width), float32, 40 binary attributes.
Every attribute is planted in block 2's max vector (vector 5): attribute a is
[3 * x[5, a] + logistic noise + b_a > 0], b_a set for 5-50% positives, so the head has to learn
to weight that vector and test accuracy says whether it did. Both sides train FLIP's head (one
shared LayerNorm, 12 raw weights, Linear(768, 40)) with BCE-with-logits, AdamW (wd 0.05) at
FLIP's CelebA settings (lr 0.3, batch 64, 100 epochs, per-epoch cosine to 0) and are scored by
mean test accuracy over the 40 attributes:

- FLIP (`flip.evaluation.token_head.fit_token_probe`): the LayerNorm's parameter-free
  normalisation done once, in place, the result kept in bfloat16 over the float32 vectors' own
  memory (`--vector-dtype`, the protocol's `vector_dtype`; the head computes in float32, the
  plain loop reads the float32 vectors); index-sliced batches from the tensor; the gradients
  written out (two passes over a batch's vectors), compiled by torch.compile for a run this
  long (compilation time included); the fused AdamW;
- baseline: a DataLoader over a TensorDataset (shuffled, seeded), an nn.Module head that
  applies the LayerNorm to every batch, torch's default AdamW; denormals flushed to zero, as
  FLIP's loop does (at lr 0.3 either head can collapse, and a collapsed head's gradients and
  AdamW state go denormal, which costs the CPU several times more per step).

Each side runs in a fresh process that builds the same vectors from the same seed. Peak memory
is that process's peak resident set size (VmHWM) while it trains and tests, beside the size of
the cached vectors it holds. The extraction part times `FlipModel.token_probe_vectors` on a
randomly initialised ViT-B/16 at 224 px (no weights are downloaded) and compares what it
caches per image with the four blocks' token maps it summarises.

    .venv/bin/python bench/token_probe_speed.py                        # the table in bench/results
    .venv/bin/python bench/token_probe_speed.py --images 8000 --test-images 2000 --epochs 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.process_memory import reset_peak, status_kb  # noqa: E402
from bench.results_io import machine, write_results  # noqa: E402
from flip.evaluation.probe_targets import ProbeTargets  # noqa: E402
from flip.evaluation.token_head import (  # noqa: E402
    ProbeSettings,
    fit_token_probe,
    normalize_vectors_,
    predict,
    resolve_vector_dtype,
)

PLANTED = 5  # block 2's max vector


def make_vectors(n: int, vectors: int, width: int, labels: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Gaussian vectors [n, V, D] and 0/1 attributes [n, A] planted in vector PLANTED."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.empty(n, vectors, width)
    for block in x.split(8192):
        block.normal_(generator=generator)
    rng = np.random.default_rng(seed)
    scores = 3.0 * x[:, PLANTED, :labels].numpy() + rng.logistic(size=(n, labels))
    prevalence = np.linspace(0.05, 0.5, labels)
    return x, scores, prevalence


def make_split(args: argparse.Namespace) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    x, scores, prevalence = make_vectors(args.images, args.vectors, args.width, args.labels, 0)
    bias = -np.array([np.quantile(scores[:, a], 1 - prevalence[a]) for a in range(args.labels)])
    xt, scores_t, _ = make_vectors(args.test_images, args.vectors, args.width, args.labels, 1)
    return x, (scores + bias > 0).astype(np.int8), xt, (scores_t + bias > 0).astype(np.int8)


class PlainHead(nn.Module):
    """FLIP's Celeba_Recognition head as its script writes it: LayerNorm per batch, raw weights, Linear."""

    def __init__(self, vectors: int, width: int, labels: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width, eps=1e-5)
        self.weights = nn.Parameter(torch.empty(1, vectors, 1))
        self.proj = nn.Linear(width, labels)
        nn.init.xavier_uniform_(self.weights)
        nn.init.xavier_uniform_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj((self.weights * self.ln(x)).sum(dim=1))


EPOCH_ENDS: list[tuple[float, float]] = []  # (perf_counter, process_time) at each epoch's end


def plain_loop(x, y, xt, args) -> np.ndarray:
    from torch.utils.data import DataLoader, TensorDataset

    # denormals flushed as FLIP's loop does: a head that collapses at lr 0.3 would otherwise make
    # this side slow for a reason that has nothing to do with how it is written
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    head = PlainHead(x.shape[1], x.shape[2], y.shape[1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loader = DataLoader(
        TensorDataset(x, torch.from_numpy(y).float()),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * epoch / args.epochs))
        head.train()
        for xb, yb in loader:
            loss = loss_fn(head(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        EPOCH_ENDS.append((time.perf_counter(), time.process_time()))
    head.eval()
    with torch.no_grad():
        return torch.cat([head(b) for b in xt.split(8192)]).numpy() > 0


def flip_probe(x, y, xt, args) -> np.ndarray:
    dtype = resolve_vector_dtype(args.vector_dtype)
    z, zt = normalize_vectors_(x, dtype), normalize_vectors_(xt, dtype)
    labels = torch.from_numpy(y).float()
    targets = ProbeTargets("attributes", y.shape[1], labels, mask=torch.ones(y.shape, dtype=torch.bool))
    compile_ = {"true": True, "false": False}.get(args.compile, args.compile)
    settings = ProbeSettings(
        "flip", 0.0, args.epochs, args.lr, args.batch_size, args.weight_decay, args.seed, compile_
    )
    head = fit_token_probe(
        z,
        targets,
        settings,
        on_epoch=lambda e, h: EPOCH_ENDS.append((time.perf_counter(), time.process_time())),
    )
    return predict(head, zt).numpy() > 0


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    x, y, xt, yt = make_split(args)
    features_mb = (x.numel() + xt.numel()) * 4 / 2**20
    ready_mb, reset = status_kb("VmRSS") / 1024, reset_peak()
    method = flip_probe if args.worker == "flip" else plain_loop
    start, cpu = time.perf_counter(), time.process_time()
    pred = method(x, y, xt, args)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    from torch._dynamo.utils import counters

    ends = [(start, cpu), *EPOCH_ENDS]
    report = {
        "epoch_seconds": [b[0] - a[0] for a, b in itertools.pairwise(ends)],
        "epoch_cpu_seconds": [b[1] - a[1] for a, b in itertools.pairwise(ends)],
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),  # 0: the step ran eagerly
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "accuracy": float((pred == yt.astype(bool)).mean()),
        # 0: the head collapsed to predicting every attribute absent (see bench/README.md)
        "predicted_positive": float(pred.mean()),
        "features_mb": features_mb,
        "rss_with_features_mb": ready_mb,
        "peak_rss_mb": status_kb("VmHWM") / 1024,
        "peak_reset": reset,
    }
    print(json.dumps(report))


def run(method: str, args: argparse.Namespace, compile_cache: str | None = None) -> dict:
    """One side in a fresh process; with `compile_cache` None, on a new, empty inductor cache."""
    cmd = [sys.executable, __file__, "--worker", method]
    for key in ("images", "test_images", "vectors", "width", "labels", "epochs", "lr", "batch_size"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key in ("weight_decay", "seed", "threads", "compile", "vector_dtype"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    with tempfile.TemporaryDirectory() as cold:  # a cold compile cache: compilation is timed
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": compile_cache or cold}
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{method} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"{method}: {result['seconds']:.1f} s, accuracy {result['accuracy']:.4f}, "
        f"peak {result['peak_rss_mb']:.0f} MB"
    )
    return result


PRIMERS = {
    # torch's one-time C++ setup (CPU-feature probes, precompiled header) cached by an unrelated
    # compile, as after any torch.compile on the machine; the probe's own step still compiles
    "toolchain": "filled first by an unrelated torch.compile (torch's one-time C++ setup cached, "
    "the probe's step not)",
    # the step itself cached too, as for every token probe of this vector shape after the first
    "shape": "filled first by a small probe of the same vector shape (the step itself cached)",
}


def compile_something_else() -> None:
    """A torch.compile that has nothing to do with the probe (the `toolchain` primer)."""
    torch.compile(lambda a: (a * 2.0).sum(), dynamic=False)(torch.randn(64))


def run_primed(primer: str, args: argparse.Namespace) -> tuple[dict | None, dict]:
    """FLIP's side on a compile cache `primer` filled first (untimed): its report, if it is a
    probe, then the timed run's."""
    with tempfile.TemporaryDirectory() as cache:
        if primer == "toolchain":
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            cmd = [sys.executable, __file__, "--worker", "toolchain"]
            subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            primed = None
        else:
            small = argparse.Namespace(**{**vars(args), "images": 4096, "test_images": 256, "epochs": 1})
            small.compile = "true"
            primed = run("flip", small, cache)
        return primed, run("flip", args, cache)


@torch.no_grad()
def extraction(images: int, batch: int, threads: int) -> dict:
    """Token-probe vectors of a random-weight ViT-B/16 at 224 px: images/s, and bytes cached per image."""
    from flip.models import build_model
    from flip.models.probe_tokens import default_probe_blocks

    torch.set_num_threads(threads)
    model = build_model("ViT-B-16").eval()
    blocks = default_probe_blocks(len(model.clip.visual.transformer.resblocks))
    pixels = torch.randn(batch, 3, 224, 224)
    model.token_probe_vectors(pixels[:2], blocks)  # warm-up
    start = time.perf_counter()
    done = 0
    while done < images:
        vectors = model.token_probe_vectors(pixels, blocks)
        done += batch
    seconds = time.perf_counter() - start
    tokens = (model.clip.visual.positional_embedding.shape[0]) * len(blocks)
    return {
        "images": done,
        "images_per_s": done / seconds,
        "blocks": blocks,
        "cached_floats_per_image": vectors[0].numel(),
        "token_map_floats_per_image": tokens * vectors.shape[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=160_000, help="training images (cached vectors)")
    parser.add_argument("--test-images", type=int, default=20_000)
    parser.add_argument("--vectors", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--labels", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.3, help="FLIP's CelebA learning rate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both sides")
    parser.add_argument(
        "--compile", choices=("auto", "true", "false"), default="auto", help="FLIP's torch.compile setting"
    )
    parser.add_argument(
        "--vector-dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="FLIP's vector_dtype: the dtype its normalised vectors are kept in",
    )
    parser.add_argument(
        "--primed",
        nargs="*",
        choices=tuple(PRIMERS),
        default=list(PRIMERS),
        help="also time FLIP's side on a compile cache filled first by these (none: cold only)",
    )
    parser.add_argument("--extract-images", type=int, default=64, help="ViT-B/16 images to time (0: skip)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "token_probe_speed.json")
    parser.add_argument("--worker", choices=("flip", "plain", "toolchain"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "toolchain":
        return compile_something_else()
    if args.worker:
        return worker(args)

    load = [round(v, 2) for v in os.getloadavg()]
    results = {m: run(m, args) for m in ("flip", "plain")}
    primed = {name: run_primed(name, args) for name in args.primed}
    extract = extraction(args.extract_images, 32, args.threads) if args.extract_images else None
    flip, plain = results["flip"], results["plain"]
    # steady state: the median epoch after the first (FLIP's first epoch includes compiling)
    later = {m: float(np.median(r["epoch_seconds"][1:] or r["epoch_seconds"])) for m, r in results.items()}
    later_cpu = {
        m: float(np.median(r["epoch_cpu_seconds"][1:] or r["epoch_cpu_seconds"])) for m, r in results.items()
    }
    report = {
        "speedup": round(plain["seconds"] / flip["seconds"], 2),
        "speedup_per_epoch": round(later["plain"] / later["flip"], 2),
        "flip_epoch_s": round(later["flip"], 2),
        "plain_epoch_s": round(later["plain"], 2),
        "speedup_per_epoch_cpu": round(later_cpu["plain"] / later_cpu["flip"], 2),
        "flip_epoch_cpu_s": round(later_cpu["flip"], 2),
        "plain_epoch_cpu_s": round(later_cpu["plain"], 2),
        "accuracy_diff_pt": round(100 * (flip["accuracy"] - plain["accuracy"]), 3),
        "flip_s": round(flip["seconds"], 1),
        "plain_s": round(plain["seconds"], 1),
        "flip_accuracy": round(flip["accuracy"], 5),
        "plain_accuracy": round(plain["accuracy"], 5),
        "features_mb": round(flip["features_mb"], 1),
        "flip_peak_rss_mb": round(flip["peak_rss_mb"], 1),
        "plain_peak_rss_mb": round(plain["peak_rss_mb"], 1),
        "flip_peak_over_features": round(flip["peak_rss_mb"] / flip["features_mb"], 3),
        "plain_peak_over_features": round(plain["peak_rss_mb"] / plain["features_mb"], 3),
        "runs": results,
        # FLIP's side again on a compile cache filled first (untimed) by each of PRIMERS
        "primed": {
            name: {
                "primer": PRIMERS[name],
                "flip_s": round(timed["seconds"], 1),
                "speedup": round(plain["seconds"] / timed["seconds"], 2),
                "flip_first_epoch_s": round(timed["epoch_seconds"][0], 2),
                "flip_accuracy": round(timed["accuracy"], 5),
                "run": timed,
                "primer_run": primer_run,
            }
            for name, (primer_run, timed) in primed.items()
        },
        "extraction": extract,
        "shape": {
            "n_train": args.images,
            "n_test": args.test_images,
            "vectors": args.vectors,
            "width": args.width,
            "labels": args.labels,
        },
        "settings": {
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "weight_decay": args.weight_decay,
            "seed": args.seed,
            "compile": args.compile,
            "vector_dtype": args.vector_dtype,
        },
        "baseline": "DataLoader(TensorDataset, shuffle) + nn.Module head (LayerNorm per batch) "
        "+ torch AdamW, "
        "denormals flushed",
        "time_method": "one run per side, each in a fresh process, training + test prediction "
        "(epoch after the first: median of epochs 2.., as FLIP's first includes normalising and "
        "compiling); "
        "peak = the process's VmHWM, cached vectors included",
        "load_average_at_start": load,
        "machine": machine(threads=args.threads),
    }
    header = (
        "| cached vectors | epochs | FLIP token probe | plain PyTorch loop | speedup | FLIP acc. "
        "| plain acc. | peak RSS / cached vectors (FLIP, plain) | epoch after the first (FLIP, plain) "
        "| speedup per epoch |"
    )
    row = (
        f"| {args.images:,} x {args.vectors} x {args.width} "
        f"({report['features_mb'] / 1024:.2f} GiB with test) "
        f"| {args.epochs} | {report['flip_s']} s | {report['plain_s']} s | {report['speedup']}x "
        f"| {flip['accuracy']:.4f} | {plain['accuracy']:.4f} "
        f"| {report['flip_peak_over_features']}, {report['plain_peak_over_features']} "
        f"| {report['flip_epoch_s']} s, {report['plain_epoch_s']} s | {report['speedup_per_epoch']}x "
        f"(CPU time {report['speedup_per_epoch_cpu']}x) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", row, ""]
    for entry in report["primed"].values():
        lines += [
            f"FLIP on a compile cache {entry['primer']}: {entry['flip_s']} s, "
            f"{entry['speedup']}x the plain loop; first epoch {entry['flip_first_epoch_s']} s against "
            f"{flip['epoch_seconds'][0]:.2f} s on a cold cache; accuracy {entry['flip_accuracy']:.4f}.",
            "",
        ]
    if extract:
        lines.append(
            f"Extraction (random-weight ViT-B/16, 224 px, blocks {extract['blocks']}): "
            f"{extract['images_per_s']:.1f} images/s; {extract['cached_floats_per_image']:,} floats cached "
            f"per image instead of {extract['token_map_floats_per_image']:,} for the token maps "
            f"({extract['token_map_floats_per_image'] / extract['cached_floats_per_image']:.0f}x fewer)."
        )
        lines.append("")
    lines.append(
        f"cpu {report['machine']['cpu']}, {args.threads} threads, torch {torch.__version__}; "
        f"{report['time_method']}; load average {load}."
    )
    write_results(args.out, report, "\n".join(lines))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
