"""Dense fine-tuning on FaceShapes: does a pretrained tiny tower fine-tune to better face parsing
and landmarks than a randomly initialised one, with the same head on the same budget?

Generates FaceShapes with parts (2,000 / 500 / 500 faces at 64 px by default) and fine-tunes, as
`python finetune.py task=parsing|landmarks` does, a demo model's image tower (`--ckpt`, a
train.py last.ckpt of the demo recipe) and the same architecture at a random initialisation
(`ckpt=null`, conf/model/tiny.yaml), both fully, with each task's default head (parsing: the
FPN/UPer head over blocks 1-3; landmarks: the per-token linear heatmaps), rate, schedule and
batches; only the start differs. The pretrained tower frozen, on the same budget, is run too
(the dense probes' setting, with the fine-tune's head and training). The scores are each run's
eval/metrics.json on the test split. A run whose folder already holds bench_row.json is read,
not run again.

    .venv/bin/python bench/finetune_dense_faceshapes.py --ckpt logs/train/runs/DATE/checkpoints/last.ckpt
    .venv/bin/python bench/finetune_dense_faceshapes.py --ckpt CKPT --steps 5 --sizes 64 16 16 --out /tmp/ft
    .venv/bin/python bench/finetune_dense_faceshapes.py --ckpt CKPT --tasks parsing \
        --runs pretrained_full random_init_full
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_io import machine, write_results  # noqa: E402
from bench.run_config import run_config  # noqa: E402
from flip.data.faceshapes import ensure_faceshapes  # noqa: E402
from flip.training.finetune.run import finetune  # noqa: E402

HEADLINES = {"parsing": ["mean_f1", "miou", "pixel_accuracy"], "landmarks": ["nme", "fr_0.1", "auc_0.1"]}
# (label, start, overrides): only the start and the adaptation (and its rate) differ
RUNS = [
    ("pretrained, full", "pretrained", ["adapt=full", "optim.lr=1e-3"]),
    ("random init, full", "random", ["adapt=full", "optim.lr=1e-3"]),
    ("pretrained, frozen", "pretrained", ["adapt=frozen", "optim.lr=1e-2"]),
]


def _key(label: str) -> str:
    """A run's name on the command line and its folder's: "pretrained, full" -> pretrained_full."""
    return label.replace(", ", "_").replace(" ", "_")


def _finetuned(run: Path, task: str, label: str, start: str, overrides: list[str], args) -> dict:
    saved = run / "bench_row.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    common = [
        f"task={task}", f"benchmark=faceshapes_{task}", f"benchmark.root={args.parts}",
        f"trainer.max_steps={args.steps}", f"data.batch_size={args.batch_size}", "data.num_workers=1",
        "~callbacks.progress_bar", f"ckpt={args.ckpt if start == 'pretrained' else 'null'}",
        f"seed={args.seed}",
    ]  # fmt: skip
    began = time.perf_counter()
    evaluated = finetune(run_config("finetune", [*common, *overrides], run, Path(args.data)))["eval"]
    row = {
        "task": task,
        "run": label,
        "start": start,
        "overrides": overrides,
        **{k: evaluated["summary"][k] for k in HEADLINES[task]},
        "seconds": round(time.perf_counter() - began, 1),
    }
    saved.write_text(json.dumps(row, indent=2) + "\n")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a demo model: a train.py last.ckpt")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", default=str(ROOT / "data"), help="holds faceshapes_parts/ (made if absent)")
    parser.add_argument(
        "--sizes", type=int, nargs=3, default=[2000, 500, 500], metavar=("TRAIN", "VAL", "TEST")
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--tasks", nargs="+", choices=list(HEADLINES), default=list(HEADLINES))
    parser.add_argument(
        "--runs", nargs="+", choices=[_key(r[0]) for r in RUNS], default=[_key(r[0]) for r in RUNS]
    )
    parser.add_argument("--out", default=str(ROOT / "logs" / "bench" / "finetune_dense_faceshapes"))
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "finetune_dense_faceshapes"))
    args = parser.parse_args(argv)
    args.parts = Path(args.data) / "faceshapes_parts"
    splits = dict(zip(("train", "val", "test"), args.sizes, strict=True))
    ensure_faceshapes(args.parts, splits, image_size=args.image_size, parts=True)

    runs = [r for r in RUNS if _key(r[0]) in args.runs]
    headlines = {task: HEADLINES[task] for task in args.tasks}
    rows = []
    for task in headlines:
        for label, start, overrides in runs:
            name = f"{task}_{_key(label)}"
            rows.append(_finetuned(Path(args.out) / name, task, label, start, overrides, args))
            print(json.dumps(rows[-1]), flush=True)

    report = {
        "machine": machine(),
        "ckpt": str(args.ckpt), "splits": splits, "image_size": args.image_size, "steps": args.steps,
        "batch_size": args.batch_size, "seed": args.seed, "runs": rows,
    }  # fmt: skip
    lines = [
        f"# Dense fine-tuning on FaceShapes ({splits['train']} / {splits['val']} / {splits['test']} faces "
        f"at {args.image_size} px, {args.steps} steps of {args.batch_size})",
        "",
        "Test-split figures of `bench/finetune_dense_faceshapes.py`: each task's default head, the same "
        "rate, schedule and batches from a pretrained tower and from its architecture at a random "
        "initialisation; seconds per run on a shared 2-core CPU, evaluation included.",
        "",
    ]
    for task, headline in headlines.items():
        lines += [
            f"| {task} | lr | " + " | ".join(headline) + " | seconds |",
            "|---" + "|---:" * (len(headline) + 2) + "|",
        ]
        for (label, _, overrides), row in zip(runs, (r for r in rows if r["task"] == task), strict=True):
            lr = next(o.split("=")[1] for o in overrides if o.startswith("optim.lr="))
            figures = " | ".join(f"{row[k]:.3f}" for k in headline)
            lines.append(f"| {label} | {lr} | {figures} | {row['seconds']:.0f} |")
        lines.append("")
    write_results(args.results, report, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
