"""The convolutional stem on channels-last images, against the usual (NCHW) layout.

`ConvStem` (flip/models/image_stem.py, the demo's `model.image_stem`) runs its convolutions on a
channels-last copy of the images. The baseline is the same stem, weights and inputs with every
layer in the usual layout (`nn.Sequential.forward`). Two measurements, alternating in rounds in
one process, the first steps left out:

- the stem alone, forward and backward at the demo's batch (128 images of 64 px);
- the demo's whole training step (FLIP's module: the demo's CLIP + FILIP loss, backward, fused
  AdamW) on the same FaceShapes batches from the same weights.

    .venv/bin/python bench/image_stem_layout.py
    .venv/bin/python bench/image_stem_layout.py --rounds 2 --steps 3   # quick check
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.demo_step import batches_of, build, step_bench_parser, step_seconds
from bench.results_io import machine, write_results
from flip.models.image_stem import ConvStem

SIDES = ("usual layout", "channels last")


def in_usual_layout(stem: ConvStem) -> ConvStem:
    """`stem`, answering with every layer in the usual layout (the baseline)."""
    stem.forward = types.MethodType(nn.Sequential.forward, stem)
    return stem


def alternate(run: dict, rounds: int, per_round: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of `run[side]()` per call, sides alternating in order each round."""
    for side in SIDES:
        for _ in range(warmup):
            run[side]()
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for round_ in range(rounds):
        for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            times[side] += [run[side]() for _ in range(per_round)]
    return times


def stem_alone(args) -> dict[str, list[float]]:
    torch.manual_seed(0)
    stems = {SIDES[1]: ConvStem([24, 48, 96], 96).train()}
    stems[SIDES[0]] = in_usual_layout(ConvStem([24, 48, 96], 96).train())
    stems[SIDES[0]].load_state_dict(stems[SIDES[1]].state_dict())
    images = torch.randn(128, 3, 64, 64)

    def seconds(stem: ConvStem) -> float:
        start = time.perf_counter()
        tokens = stem(images).flatten(2).transpose(1, 2)  # [B, tokens, width], as the ViT reads them
        tokens.square().mean().backward()
        stem.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    run = {side: (lambda stem=stem: seconds(stem)) for side, stem in stems.items()}
    return alternate(run, args.rounds, args.stem_calls, args.warmup)


def demo_step(args, work: Path) -> dict[str, list[float]]:
    cfg, channels_last, channels_last_opt = build(["experiment=demo"], work / "a", args.data)
    _, usual, usual_opt = build(["experiment=demo"], work / "b", args.data)
    usual.load_state_dict(channels_last.state_dict())
    in_usual_layout(usual.model.clip.visual.conv1)
    batches = batches_of(cfg, usual, args.steps)
    cursor = {side: 0 for side in SIDES}
    sides = {SIDES[0]: (usual, usual_opt), SIDES[1]: (channels_last, channels_last_opt)}

    def seconds(side: str) -> float:
        module, optimizer = sides[side]
        batch = batches[cursor[side] % len(batches)]
        cursor[side] += 1
        return step_seconds(module, optimizer, batch)

    run = {side: (lambda side=side: seconds(side)) for side in SIDES}
    return alternate(run, args.rounds, args.steps, args.warmup)


def summary(times: dict[str, list[float]]) -> dict:
    usual, last = (statistics.median(times[side]) for side in SIDES)
    return {
        "usual_layout_ms": round(usual * 1e3, 1),
        "channels_last_ms": round(last * 1e3, 1),
        "speedup": round(usual / last, 3),
        "calls_timed_each": len(times[SIDES[0]]),
    }


def markdown(report: dict) -> str:
    lines = [
        "| measured | usual layout (ms) | channels last (ms) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for name, r in report["cases"].items():
        lines.append(f"| {name} | {r['usual_layout_ms']} | {r['channels_last_ms']} | {r['speedup']}x |")
    m = report["machine"]
    counts = ", ".join(f"{r['calls_timed_each']} ({name})" for name, r in report["cases"].items())
    lines += [
        "",
        f"Medians of {counts} calls each, alternating in {report['rounds']} rounds; {m['cpu']}, "
        f"{m['threads']} threads, torch {m['torch']}, 1-min load average {m['load_average_1min']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = step_bench_parser(__doc__, "bench/results/image_stem_layout")
    parser.add_argument("--stem-calls", type=int, default=10, help="stem calls per round and side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = {"the stem, forward + backward (batch 128, 64 px)": summary(stem_alone(args))}
    with tempfile.TemporaryDirectory() as tmp:
        cases["the demo's training step"] = summary(demo_step(args, Path(tmp)))
    report = {"rounds": args.rounds, "cases": cases, "machine": machine()}
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
