"""Attention kernels on this CPU: torch's own choice (flash) against the math kernel, forward + backward.

The measurement behind `attention_kernels` (conf/train.yaml) and the demo's `{bf16-mixed: [math]}`
(conf/experiment/demo.yaml): for each tower shape (the demo's, and ViT-B/16 + BERT-base's at a
small batch) and each precision, the median time of `scaled_dot_product_attention` forward and
backward with each kernel, in alternating order, and their ratio. A ratio above 1 means the math
kernel is faster than torch's choice for that shape and precision.

    .venv/bin/python bench/attention_kernels.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*
from bench.results_io import machine, write_results  # noqa: E402

# (batch, heads, tokens, head width) of one attention call per tower
SHAPES = {
    "demo image tower (64 px / 8, width 96)": (128, 2, 65, 48),
    "demo text tower (48 tokens, width 96)": (128, 2, 48, 48),
    "ViT-B/16 image tower, batch 16": (16, 12, 197, 64),
    "BERT-base-sized text tower, batch 16": (16, 12, 77, 64),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def forward_backward_seconds(shape: tuple[int, ...], dtype: torch.dtype, kernel: SDPBackend) -> float:
    """One forward + backward through the kernel, on fresh random inputs of the shape."""
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    start = time.perf_counter()
    with sdpa_kernel(kernel):
        out = F.scaled_dot_product_attention(q, k, v)
    out.sum().backward()
    return time.perf_counter() - start


def measure(shape, dtype, repeats: int) -> dict[str, float]:
    for kernel in KERNELS.values():  # warm-up: first calls allocate and pick code paths
        forward_backward_seconds(shape, dtype, kernel)
    times: dict[str, list[float]] = {name: [] for name in KERNELS}
    for repeat in range(repeats):
        order = list(KERNELS) if repeat % 2 == 0 else list(KERNELS)[::-1]
        for name in order:
            times[name].append(forward_backward_seconds(shape, dtype, KERNELS[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for tower, shape in SHAPES.items():
        for precision, dtype in DTYPES.items():
            seconds = measure(shape, dtype, args.repeats)
            rows.append(
                {
                    "tower": tower,
                    "shape_bhld": shape,
                    "precision": precision,
                    "flash_ms": round(seconds["flash"] * 1e3, 2),
                    "math_ms": round(seconds["math"] * 1e3, 2),
                    "math_speedup": round(seconds["flash"] / seconds["math"], 2),
                }
            )
            print(rows[-1], flush=True)
    result = {
        "rows": rows,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": machine(),
    }
    write_results(RESULTS / "attention_kernels", result, markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "| tower | (batch, heads, tokens, head width) | precision | flash (torch's choice) | math "
        "| math speed-up |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        shape = ", ".join(map(str, r["shape_bhld"]))
        lines.append(
            f"| {r['tower']} | ({shape}) | {r['precision']} | {r['flash_ms']} ms | {r['math_ms']} ms | "
            f"{r['math_speedup']}x |"
        )
    return (
        "\n".join(lines)
        + f"\n\nMedian of {result['repeats']} alternating forward + backward calls each, {result['threads']} "
        f"threads, {result['machine']['cpu']}, torch {result['machine']['torch']}.\n"
    )


if __name__ == "__main__":
    main()
