"""Dense probes on FaceShapes: do a pretrained tiny tower's patch tokens parse faces and place
landmarks better than a randomly initialised tower's, with the same head on the same budget?

Generates FaceShapes with parts (2,000 / 500 / 500 faces at 64 px by default), takes a demo
model (`--ckpt`, or pretrains the demo recipe for `--pretrain-steps` first) and its
architecture at a seeded random initialisation, and runs the parsing and landmark probes of
conf/protocol/ on both, through the code `eval/parsing_probe.py` and `eval/landmark_probe.py`
run (`flip.evaluation.evaluate_config` on their composed configs). Only the tower differs.

    .venv/bin/python bench/dense_probe_faceshapes.py --ckpt logs/train/runs/DATE/checkpoints/last.ckpt
    .venv/bin/python bench/dense_probe_faceshapes.py --pretrain-steps 400
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
from flip.checkpoint import load  # noqa: E402
from flip.data.faceshapes import ensure_faceshapes  # noqa: E402
from flip.evaluation.run import evaluate_config  # noqa: E402
from flip.models import build_model  # noqa: E402

PROBES = {"parsing": ("parsing_probe", ["mean_f1", "miou", "pixel_accuracy"]),
          "landmarks": ("landmark_probe", ["nme", "fr_0.1", "auc_0.1"])}  # fmt: skip


def _pretrain(steps: int, out: Path, data: Path) -> Path:
    from flip.training.run import train  # Lightning's import, only when pretraining here

    train(run_config("train", [f"trainer.max_steps={steps}", "evaluate=false"], out, data))
    return out / "checkpoints" / "last.ckpt"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a demo model; without it, the demo recipe is pretrained first")
    parser.add_argument("--pretrain-steps", type=int, default=1600)
    parser.add_argument("--data", default=str(ROOT / "data"), help="holds faceshapes_parts/ (made if absent)")
    parser.add_argument(
        "--sizes", type=int, nargs=3, default=[2000, 500, 500], metavar=("TRAIN", "VAL", "TEST")
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="of the random initialisation")
    parser.add_argument("--out", default=str(ROOT / "logs" / "bench" / "dense_probe_faceshapes"))
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "dense_probe_faceshapes"))
    args = parser.parse_args(argv)
    out, data = Path(args.out), Path(args.data)
    parts = data / "faceshapes_parts"
    splits = dict(zip(("train", "val", "test"), args.sizes, strict=True))
    ensure_faceshapes(parts, splits, image_size=args.image_size, parts=True)

    ckpt = Path(args.ckpt) if args.ckpt else _pretrain(args.pretrain_steps, out / "pretrain", data)
    trained = load(ckpt)
    torch.manual_seed(args.seed)
    models = {"pretrained": trained, "random init": build_model(**trained.config).eval()}

    rows = []
    for task, (protocol, headline) in PROBES.items():
        for start, model in models.items():
            run = out / f"{task}_{start.replace(' ', '_')}"
            overrides = [
                f"benchmark=faceshapes_{task}", f"benchmark.root={parts}", f"output_dir={run}",
                "feature_cache_dir=null", "num_workers=0", f"protocols.{protocol}.epochs={args.epochs}",
            ]  # fmt: skip
            began = time.perf_counter()
            metrics = evaluate_config(
                model, run_config(f"eval_{protocol}", overrides, run, data), run, checkpoint=start
            )
            result = metrics[protocol]
            rows.append(
                {"task": task, "start": start, **{k: result["summary"][k] for k in headline},
                 "epoch": result["selected"]["epoch"], "seconds": round(time.perf_counter() - began, 1)}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

    report = {
        "machine": machine(),
        "ckpt": str(ckpt), "pretrain_steps": None if args.ckpt else args.pretrain_steps,
        "splits": splits, "image_size": args.image_size, "epochs": args.epochs, "seed": args.seed,
        "runs": rows,
    }  # fmt: skip
    lines = [
        f"# Dense probes on FaceShapes ({splits['train']} / {splits['val']} / {splits['test']} faces at "
        f"{args.image_size} px, {args.epochs} epochs)",
        "",
        "Test-split figures of `bench/dense_probe_faceshapes.py`: the same head and budget on a "
        "pretrained tower and on its architecture at a random initialisation.",
        "",
    ]
    for task, (_, headline) in PROBES.items():
        lines += [
            f"| {task} | " + " | ".join(headline) + " | epoch | seconds |",
            "|---" + "|---:" * (len(headline) + 2) + "|",
        ]
        for row in (r for r in rows if r["task"] == task):
            figures = " | ".join(f"{row[k]:.3f}" for k in headline)
            lines.append(f"| {row['start']} | {figures} | {row['epoch']} | {row['seconds']:.0f} |")
        lines.append("")
    write_results(args.results, report, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
