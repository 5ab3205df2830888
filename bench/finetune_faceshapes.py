"""Fine-tuning on FaceShapes: does a briefly pretrained tiny tower fine-tune better than a random one?

Pretrains the demo recipe (tiny ViT + text transformer, CLIP + FILIP on FaceShapes) for a few
hundred steps, then fine-tunes its image tower with a linear head on FaceShapes' 11 binary
attributes (task=attributes) for the same number of steps from each start: the pretrained
tower and a randomly initialised one of the same architecture, both fully fine-tuned with the
same head, rate and batches. LoRA and a frozen tower from the pretrained start are run on the
same budget too, for docs/finetuning.md's advice on which adaptation to pick. Every run is the
code `python finetune.py` runs; the score is the mean balanced accuracy over the attributes of
the 2,000-face test split (metrics.json of each run). The pretrained and random starts are
fine-tuned with three seeds each (head init, batch order, augmentation), LoRA and frozen with one.
A run whose folder under --out already holds its result (bench_row.json) is read, not run again,
and so is the pretraining whose last.ckpt is at --pretrain-steps: an interrupted bench resumes.

    .venv/bin/python bench/finetune_faceshapes.py    # the table in bench/results/finetune_faceshapes.md
    .venv/bin/python bench/finetune_faceshapes.py --pretrain-steps 20 --finetune-steps 10 --out /tmp/ft
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_io import machine, write_results  # noqa: E402
from bench.run_config import run_config  # noqa: E402
from flip.training.finetune.run import finetune  # noqa: E402
from flip.training.run import train  # noqa: E402

# (label, start, overrides, seeds): the same budget and head for each; only the start, the adaptation
# (and its rate) and the seed differ
RUNS = [
    ("pretrained, full", "pretrained", ["adapt=full", "optim.lr=1e-3"], (42, 43, 44)),
    ("random init, full", "random", ["adapt=full", "optim.lr=1e-3"], (42, 43, 44)),
    ("pretrained, LoRA r=8", "pretrained", ["adapt=lora", "optim.lr=3e-3"], (42,)),
    ("pretrained, frozen", "pretrained", ["adapt=frozen", "optim.lr=1e-2"], (42,)),
]


def _finetuned(
    run: Path, label: str, start: str, overrides: list[str], seed: int, ckpt: Path, data: Path, args
):
    """One fine-tune's row of the table: read from run/bench_row.json when it ran before."""
    saved = run / "bench_row.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    common = [
        "task=attributes", "benchmark=faceshapes", f"trainer.max_steps={args.finetune_steps}",
        f"data.batch_size={args.batch_size}", "data.num_workers=1", "~callbacks.progress_bar",
        f"ckpt={ckpt if start == 'pretrained' else 'null'}", f"seed={seed}",
    ]  # fmt: skip
    began = time.perf_counter()
    results = finetune(run_config("finetune", [*common, *overrides], run, data))
    evaluated = results["eval"]
    row = {
        "run": label,
        "seed": seed,
        "start": start,
        "overrides": overrides,
        "mean_balanced_accuracy": evaluated["summary"]["mean_balanced_accuracy"],
        "mean_accuracy": evaluated["summary"]["mean_accuracy"],
        "per_attribute": {n: m["balanced_accuracy"] for n, m in evaluated["per_label"].items()},
        "seconds": round(time.perf_counter() - began, 1),
    }
    saved.write_text(json.dumps(row, indent=2) + "\n")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", default=str(ROOT / "data"), help="holds faceshapes/ (made if absent)")
    parser.add_argument("--out", default=str(ROOT / "logs" / "bench" / "finetune_faceshapes"))
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "finetune_faceshapes"))
    args = parser.parse_args(argv)
    out, data = Path(args.out), Path(args.data)

    pretrain = out / "pretrain"
    ckpt = pretrain / "checkpoints" / "last.ckpt"
    timing = pretrain / "bench_seconds.json"
    done = ckpt.is_file() and torch.load(ckpt, weights_only=True)["global_step"] == args.pretrain_steps
    if not (done and timing.is_file()):
        started = time.perf_counter()
        overrides = [f"trainer.max_steps={args.pretrain_steps}", "evaluate=false"]
        train(run_config("train", overrides, pretrain, data))
        timing.write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1)}) + "\n")
    pretrain_s = json.loads(timing.read_text())["seconds"]

    rows = []
    for label, start, overrides, seeds in RUNS:
        for seed in seeds:
            name = f"{label}, seed {seed}".replace(", ", "_").replace(" ", "_").replace("=", "")
            rows.append(_finetuned(out / name, label, start, overrides, seed, ckpt, data, args))
            print(json.dumps(rows[-1]), flush=True)

    report = {
        "machine": machine(),
        "pretrain_steps": args.pretrain_steps, "pretrain_seconds": round(pretrain_s, 1),
        "finetune_steps": args.finetune_steps, "batch_size": args.batch_size, "runs": rows,
    }  # fmt: skip
    lines = [
        f"# Fine-tuning on FaceShapes ({args.finetune_steps} steps of {args.batch_size}, after "
        f"{args.pretrain_steps} pretraining steps in {pretrain_s:.0f} s)",
        "",
        "Mean balanced accuracy over the 11 attributes of the 2,000-face test split, per fine-tuning "
        "seed (`bench/finetune_faceshapes.py`); seconds per run on a shared 2-core CPU, evaluation "
        "included.",
        "",
        "| run | lr | seeds | mean balanced accuracy | per seed | mean accuracy | seconds |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for label, _, overrides, seeds in RUNS:
        mine = [r for r in rows if r["run"] == label]
        lr = next(o.split("=")[1] for o in overrides if o.startswith("optim.lr="))
        scores = [r["mean_balanced_accuracy"] for r in mine]
        lines.append(
            f"| {label} | {lr} | {len(seeds)} | {sum(scores) / len(scores):.3f} | "
            f"{', '.join(f'{v:.3f}' for v in scores)} | "
            f"{sum(r['mean_accuracy'] for r in mine) / len(mine):.3f} | "
            f"{sum(r['seconds'] for r in mine) / len(mine):.0f} |"
        )
    write_results(args.results, report, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
