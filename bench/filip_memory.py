"""Peak memory, time and agreement of chunked vs dense (naive) FILIP loss, forward + backward.

Each method runs in a fresh subprocess so that neither inherits the other's allocations.
Memory is the peak resident set size of that process (VmHWM in /proc/self/status, reset
through /proc/self/clear_refs after the inputs exist) minus the resident size once the inputs
are built: it sees every allocation torch makes, which tracemalloc would not. Loss and
gradients of both runs are saved and compared in the parent.

    .venv/bin/python bench/filip_memory.py            # B=256, Ni=197, Nt=77, d=256, fp32
    .venv/bin/python bench/filip_memory.py --batch 64 # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.process_memory import reset_peak, status_kb  # noqa: E402
from bench.results_io import machine, write_results  # noqa: E402
from flip.losses import FilipLoss  # noqa: E402
from flip.losses.clip import symmetric_cross_entropy  # noqa: E402


def make_inputs(batch: int, n_img: int, n_txt: int, dim: int, seed: int = 0):
    """Normalised random tokens, captions of 8..n_txt valid tokens (ragged), scale 1/0.07."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, n_img, dim, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, n_txt, dim, generator=g), dim=-1).requires_grad_()
    lengths = torch.randint(8, n_txt + 1, (batch,), generator=g)
    mask = torch.arange(n_txt)[None] < lengths[:, None]
    scale = torch.tensor(1 / 0.07).requires_grad_()
    return image, text, mask, scale


def naive_loss(image, text, mask, scale):
    """The obvious dense version: the whole B x B x Ni x Nt similarity, pads at -inf."""
    sim = torch.einsum("ikd,jrd->ijkr", image, text).masked_fill(~mask[None, :, None, :], float("-inf"))
    i2t = sim.max(3).values.mean(2)
    t2i = torch.where(mask[None], sim.max(2).values, 0.0).sum(2) / mask.sum(1)
    labels = torch.arange(image.shape[0], device=image.device)
    return symmetric_cross_entropy(scale * i2t, scale * t2i.T, labels)


def chunked_loss(chunk_size: int):
    loss = FilipLoss(chunk_size=chunk_size, exclude_sot=False)
    return lambda image, text, mask, scale: loss(image, text, scale, text_token_mask=mask)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    fn = naive_loss if args.worker == "naive" else chunked_loss(args.chunk_size)
    fn(*make_inputs(4, 9, 12, 16)).backward()  # load kernels and thread pools outside the measurement
    image, text, mask, scale = make_inputs(args.batch, args.n_img, args.n_txt, args.dim)
    base_kb, reset = status_kb("VmRSS"), reset_peak()
    times = []
    for _ in range(args.repeats):
        image.grad = text.grad = scale.grad = None
        start = time.perf_counter()
        loss = fn(image, text, mask, scale)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak_mb = (status_kb("VmHWM") - base_kb) / 1024
    torch.save(
        {"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad}, args.save
    )
    print(json.dumps({"peak_mb": peak_mb, "times": times, "peak_reset": reset}))


def run(method: str, args: argparse.Namespace, save: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--save", save]
    for key in ("batch", "n_img", "n_txt", "dim", "chunk_size", "repeats", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--n-img", type=int, default=197)
    parser.add_argument("--n-txt", type=int, default=77)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed forward+backward runs per method (best)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "filip_memory.json")
    parser.add_argument("--worker", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    load = [round(x, 2) for x in os.getloadavg()]
    dense_gb = args.batch**2 * args.n_img * args.n_txt * 4 / 1e9
    print(f"dense similarity tensor: {dense_gb:.2f} GB (fp32); autograd keeps several of its size")
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run(m, args, f"{tmp}/{m}.pt") for m in ("naive", "chunked")}
        naive, chunked = (torch.load(f"{tmp}/{m}.pt") for m in ("naive", "chunked"))
    diffs = {key: (naive[key] - chunked[key]).abs().max().item() for key in naive}
    naive_s, chunked_s = (min(results[m]["times"]) for m in ("naive", "chunked"))
    report = {
        "naive_peak_mb": round(results["naive"]["peak_mb"], 1),
        "chunked_peak_mb": round(results["chunked"]["peak_mb"], 1),
        "memory_ratio": round(results["chunked"]["peak_mb"] / results["naive"]["peak_mb"], 4),
        "naive_s": round(naive_s, 3),
        "chunked_s": round(chunked_s, 3),
        "time_ratio": round(chunked_s / naive_s, 3),
        "max_abs_diff": max(diffs.values()),
        "max_abs_diff_by_output": diffs,
        "shape": {"batch": args.batch, "n_img": args.n_img, "n_txt": args.n_txt, "dim": args.dim},
        "chunk_size": args.chunk_size,
        "dense_similarity_gb": round(dense_gb, 2),
        "dtype": "float32",
        "times_s": {m: [round(t, 3) for t in results[m]["times"]] for m in results},
        "memory_method": "peak RSS (VmHWM) minus RSS after inputs are built, fresh subprocess per method"
        + ("" if all(r["peak_reset"] for r in results.values()) else " (VmHWM reset unavailable)"),
        "time_method": f"best wall time of {args.repeats} forward+backward runs (the machine may be shared)",
        "load_average_at_start": load,
        "machine": machine(threads=args.threads),
    }
    assert math.isfinite(report["max_abs_diff"])
    write_results(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
