"""What a training step costs with statements, with whole-caption foils, and with neither.

Issue 19 asks for attribute hard negatives within the demo's time. Whole-caption foils
(`experiment=demo_foils`: eight per caption) make the text tower encode nine captions per image;
statements (`experiment=demo_statements`: `data.hard_negatives.form=statement`, five groups of
short noun phrases per caption in plain wording; the demo's seven) encode each distinct statement
once (32 a batch), cut to the positions statements use, and are scored by the terms whose choice
is on (the clip term's, or FILIP's too). The baseline is the step of the demo before it took
statements (`experiment=demo loss=clip_filip`: CLIP + FILIP, no foils); the demo now
(`experiment=demo`) is the CLIP loss with statements; two recipes drop FILIP's term (`loss=clip`),
with statements and without, for what its token matching costs. Each recipe is the module's
training step with its loss, backward and fused AdamW, on the recipe's own FaceShapes batches,
from the same initial weights, in one process, alternating in rounds; the first calls are left
out. The step is the run's last, so the choice term is on (at step 0 its ramp has it off, and
statements would not be scored at all). In float32, or as the trainer runs on a CPU with native
bf16 (`--precision bf16-mixed`: the forward under bfloat16 autocast, with the demo's attention
kernels). What the data loader spends making statements is not in it: the training runs' minutes
in docs/training.md are.

    .venv/bin/python bench/statements.py --precision bf16-mixed
    .venv/bin/python bench/statements.py
    .venv/bin/python bench/statements.py --rounds 2 --steps 3   # quick check
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.demo_step import (
    alternate,
    batches_of,
    build,
    cycling_steps,
    step_bench_parser,
    trainer_precision,
)
from bench.results_io import machine, machine_line, write_results

BASELINE = "experiment=demo loss=clip_filip"
# the overrides of each recipe, and what it is
RECIPES = {
    BASELINE: "the demo until it took statements: CLIP + FILIP, no foils",
    "experiment=demo": "the demo: the CLIP loss, 7 plain statement groups per caption, the choice centred",
    "experiment=demo data.hard_negatives.per_caption=5": "the same with 5 groups",
    "experiment=demo_statements": (
        "statements: 5 plain groups per caption, chosen by the clip term, beside FILIP's"
    ),
    "experiment=demo_statements loss.terms.filip.loss.foil_choice_weight=3.0": "the same, both terms choose",
    "experiment=demo_statements loss=clip": "the same, chosen by the CLIP loss alone (no FILIP term)",
    "experiment=demo loss=clip": "the CLIP loss alone, no foils",
    "experiment=demo_foils": "whole-caption foils: 8 per caption",
}


def main() -> None:
    parser = step_bench_parser(__doc__, "bench/results/statements")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run, texts_per_image, configs = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in RECIPES:
            cfg, module, optimizer = build(name.split(), Path(tmp) / str(len(run)), args.data)
            configs[name] = cfg
            batches = batches_of(cfg, module, args.steps)
            run[name] = cycling_steps(module, optimizer, batches)
            foils = [b[3].flatten(1).sum(1).float() for b in batches if len(b) > 3]
            texts_per_image[name] = 1 + (float(torch.cat(foils).mean()) if foils else 0.0)
        # every recipe is the demo's with more: the demo's attention kernels are theirs
        with trainer_precision(configs[BASELINE], args.precision):
            times = alternate(run, args.rounds, args.steps, args.warmup)
    base = statistics.median(times[BASELINE])
    report = {
        "baseline": BASELINE,
        "rounds": args.rounds,
        "precision": args.precision,
        "recipes": {
            name: {
                "what": what,
                "texts_per_image": round(texts_per_image[name], 2),
                "step_s": round(statistics.median(times[name]), 4),
                "vs_baseline": round(statistics.median(times[name]) / base, 3),
                "timed_each": len(times[name]),
            }
            for name, what in RECIPES.items()
        },
        "machine": machine(),
    }
    write_results(args.out, report, markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "| recipe | what it is | texts per image | s per step | vs baseline |",
        "|---|---|---:|---:|---:|",
    ]
    for name, r in report["recipes"].items():
        lines.append(
            f"| `{name}` | {r['what']} | {r['texts_per_image']} | {r['step_s']} | {r['vs_baseline']}x |"
        )
    lines += [
        "",
        f"Medians, alternating in {report['rounds']} rounds; {report['precision']}; every step "
        f"after the choice's ramp; baseline `{report['baseline']}`; {machine_line(report['machine'])}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
