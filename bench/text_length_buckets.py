"""The demo's training step with captions encoded in length buckets, against the whole context.

`model.text_length_buckets` (flip/models/length_buckets.py) encodes each batch's captions in
groups of similar length, each cut to its longest caption; the baseline is the same model
encoding every caption over the whole 48-token context. Both steps are FLIP's module on the same
FaceShapes batches (training step with the demo's loss, backward, fused AdamW), from the same
weights, in one process, alternating in rounds; the first steps are left out. Each case is the
demo recipe, with and without foil captions (`data.hard_negatives`, which the text tower also
encodes).

    .venv/bin/python bench/text_length_buckets.py
    .venv/bin/python bench/text_length_buckets.py --rounds 2 --steps 3   # quick check
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.demo_step import alternate, batches_of, cycling_steps, step_bench_parser
from bench.demo_step import build as build_step
from bench.results_io import machine, machine_line, write_results

# the demo's step as it was measured, before the demo took statements: CLIP + FILIP, captions only
CASES = {
    "demo": ["experiment=demo", "loss=clip_filip"],
    "demo, 2 foils per caption": [
        "experiment=demo",
        "loss=clip_filip",
        "data.hard_negatives={source:grammar,per_caption:2}",
    ],
}


def build(overrides: list[str], buckets: int, work: Path, data: Path):
    """FLIP's module and optimizer for the recipe, with `buckets` length buckets (0: off)."""
    return build_step([*overrides, f"++model.text_length_buckets={buckets}"], work, data)


def measure(overrides: list[str], buckets: int, args, work: Path, data: Path) -> dict:
    cfg, whole, whole_opt = build(overrides, 0, work / "whole", data)
    _, bucketed, bucketed_opt = build(overrides, buckets, work / "buckets", data)
    bucketed.load_state_dict(whole.state_dict())
    batches = batches_of(cfg, whole, args.steps)
    run = {
        "whole": cycling_steps(whole, whole_opt, batches),
        "buckets": cycling_steps(bucketed, bucketed_opt, batches),
    }
    times = alternate(run, args.rounds, len(batches), args.warmup)
    whole_s, buckets_s = statistics.median(times["whole"]), statistics.median(times["buckets"])
    return {
        "overrides": overrides,
        "whole_context_s_per_step": round(whole_s, 4),
        "length_buckets_s_per_step": round(buckets_s, 4),
        "speedup": round(whole_s / buckets_s, 3),
        "steps_timed_each": len(times["whole"]),
    }


def markdown(report: dict) -> str:
    lines = [
        f"| recipe | whole context (s/step) | {report['buckets']} length buckets (s/step) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for name, r in report["cases"].items():
        whole, buckets = r["whole_context_s_per_step"], r["length_buckets_s_per_step"]
        lines.append(f"| {name} | {whole} | {buckets} | {r['speedup']}x |")
    lines += [
        "",
        f"Medians of {next(iter(report['cases'].values()))['steps_timed_each']} steps each, alternating in "
        f"{report['rounds']} rounds; {machine_line(report['machine'])}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = step_bench_parser(__doc__, "bench/results/text_length_buckets")
    parser.add_argument("--buckets", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            name: measure(o, args.buckets, args, Path(tmp) / str(i), args.data)
            for i, (name, o) in enumerate(CASES.items())
        }
    report = {"buckets": args.buckets, "rounds": args.rounds, "cases": cases, "machine": machine()}
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
