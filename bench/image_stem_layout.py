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
from bench.demo_step import alternate, batches_of, build, cycling_steps, step_bench_parser
from bench.results_io import machine, machine_line, write_results
from flip.models.image_stem import ConvStem

SIDES = ("usual layout", "channels last")


def in_usual_layout(stem: ConvStem) -> ConvStem:
    """`stem`, answering with every layer in the usual layout (the baseline)."""
    stem.forward = types.MethodType(nn.Sequential.forward, stem)
    return stem


def stem_alone(args) -> dict[str, list[float]]:
    torch.manual_seed(0)
    channels_last = ConvStem([24, 48, 96], 96).train()
    usual = in_usual_layout(ConvStem([24, 48, 96], 96).train())
    usual.load_state_dict(channels_last.state_dict())
    stems = {SIDES[0]: usual, SIDES[1]: channels_last}  # alternate() takes the sides in this order
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
    # the demo's step as it was measured, before the demo took statements (CLIP + FILIP)
    recipe = ["experiment=demo", "loss=clip_filip"]
    cfg, channels_last, channels_last_opt = build(recipe, work / "a", args.data)
    _, usual, usual_opt = build(recipe, work / "b", args.data)
    usual.load_state_dict(channels_last.state_dict())
    in_usual_layout(usual.model.clip.visual.conv1)
    batches = batches_of(cfg, usual, args.steps)
    run = {
        SIDES[0]: cycling_steps(usual, usual_opt, batches),
        SIDES[1]: cycling_steps(channels_last, channels_last_opt, batches),
    }
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
    counts = ", ".join(f"{r['calls_timed_each']} ({name})" for name, r in report["cases"].items())
    lines += [
        "",
        f"Medians of {counts} calls each, alternating in {report['rounds']} rounds; "
        f"{machine_line(report['machine'])}.",
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
