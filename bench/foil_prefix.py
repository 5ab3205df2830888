"""Foils encoded from where they leave their captions, against foils encoded whole.

With attribute hard negatives (`data.hard_negatives`) each caption's foils go through the text
tower too: eight foils make nine captions per image. In open_clip's causal tower a foil's states
before its changed phrase are its caption's, so with `model.foil_prefix_sharing=true` FLIP's
model runs only each foil's suffix on the caption's keys and values (flip/models/foil_prefix.py).
The baseline is the same model encoding every foil whole (the default, false), from the same
weights, in one process, alternating in rounds; the first calls are left out. Measured:

- the demo's training step (the module's training step with the recipe's loss, backward, fused
  AdamW, float32) on the same FaceShapes batches, with eight foils and with two;
- the text side alone (captions and their eight foils, forward and backward, token features
  as FILIP reads them) of open_clip's ViT-B-16 text tower, 12 blocks of width 512, where the
  text tower is a larger share of a step than in the demo's 2 blocks of width 96.

    .venv/bin/python bench/foil_prefix.py
    .venv/bin/python bench/foil_prefix.py --rounds 2 --steps 3   # quick check
"""

from __future__ import annotations

import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.demo_step import alternate, batches_of, build, cycling_steps, step_bench_parser
from bench.results_io import machine, machine_line, write_results
from flip.data.foils import FoilMaker
from flip.models import build_model

FIVE = ("expression", "beard", "mustache", "bangs", "long_hair")
# the CLIP + FILIP demo (before it took statements), with caption foils
CASES = {
    "demo step, 8 foils of expression, beard, mustache, bangs, long hair": [
        "experiment=demo",
        "loss=clip_filip",
        f"data.hard_negatives={{source:grammar,per_caption:8,attributes:[{','.join(FIVE)}]}}",
    ],
    "demo step, 2 foils of any attribute": [
        "experiment=demo",
        "loss=clip_filip",
        "data.hard_negatives={source:grammar,per_caption:2}",
    ],
}
TEXT_TOWER = "ViT-B-16"
TEXT_CAPTIONS = 32


def medians(times: dict[str, list[float]], foils_per_caption: float, what: str) -> dict:
    whole_s, shared_s = statistics.median(times["whole"]), statistics.median(times["shared"])
    return {
        "measures": what,
        "foils_per_caption": round(foils_per_caption, 2),
        "whole_foils_s": round(whole_s, 4),
        "from_the_difference_s": round(shared_s, 4),
        "speedup": round(whole_s / shared_s, 3),
        "timed_each": len(times["whole"]),
    }


def demo_step(overrides: list[str], args, work: Path) -> dict:
    cfg, whole, whole_opt = build(overrides, work / "whole", args.data)
    _, shared, shared_opt = build([*overrides, "model.foil_prefix_sharing=true"], work / "shared", args.data)
    shared.load_state_dict(whole.state_dict())
    assert shared.model.foil_prefix_sharing and not whole.model.foil_prefix_sharing
    batches = batches_of(cfg, shared, args.steps)
    run = {
        "whole": cycling_steps(whole, whole_opt, batches),
        "shared": cycling_steps(shared, shared_opt, batches),
    }
    times = alternate(run, args.rounds, len(batches), args.warmup)
    per_caption = float(torch.cat([b[3].float().sum(1) for b in batches]).mean())
    return {"overrides": overrides, **medians(times, per_caption, "s per training step")}


def faceshapes_foils(data: Path, count: int) -> tuple[list[str], list[list[str]]]:
    """The first `count` FaceShapes training captions and up to 8 foils of each (FIVE attributes)."""
    maker = FoilMaker(source="grammar", per_caption=8, attributes=FIVE)
    shard = sorted((data / "faceshapes" / "train").glob("*.tar"))[0]
    members: dict[str, dict[str, str]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            if ext in ("txt", "json") and len(members) <= count:
                members.setdefault(key, {})[ext] = tar.extractfile(member).read().decode()
    samples = [m for m in members.values() if len(m) == 2][:count]
    captions = [s["txt"] for s in samples]
    foils = [
        [f.text for f in maker({"text": s["txt"], "json": json.loads(s["json"]), "__seed__": i})]
        for i, s in enumerate(samples)
    ]
    return captions, foils


def text_side(args) -> dict:
    captions, foils = faceshapes_foils(args.data, TEXT_CAPTIONS)
    torch.manual_seed(0)
    model = build_model(TEXT_TOWER, text_length_buckets=4, foil_prefix_sharing=True).train()
    text = model.tokenize(captions)
    width = max(len(f) for f in foils)
    mask = torch.tensor([[i < len(f) for i in range(width)] for f in foils])
    foil_ids = model.tokenize([t for f in foils for t in f + [""] * (width - len(f))]).view(
        len(foils), width, -1
    )
    layers = 2 * len(model.clip.transformer.resblocks)

    def whole() -> float:
        pooled, tokens = model._text_with_tokens(text)
        return step(pooled, tokens, model.encode_foils(foil_ids, True, mask))

    def shared() -> float:
        encoded = model._text_with_tokens(text, keys_values=True)
        pooled, tokens = encoded[:2]
        return step(
            pooled, tokens, model._encode_foil_suffixes(foil_ids, mask, text, tokens, encoded[-layers:])
        )

    def step(pooled, tokens, encoded) -> None:
        loss = (
            pooled.sum()
            + tokens.sum()
            + encoded["foil_text_features"].sum()
            + encoded["foil_text_tokens"].sum()
        )
        loss.backward()
        model.zero_grad(set_to_none=True)

    def timed(function):
        def call() -> float:
            start = time.perf_counter()
            function()
            return time.perf_counter() - start

        return call

    times = alternate({"whole": timed(whole), "shared": timed(shared)}, args.rounds, 2, 1)
    what = (
        f"s per forward and backward of {len(captions)} captions and their foils, {TEXT_TOWER}'s text tower"
    )
    return {"model": TEXT_TOWER, **medians(times, float(mask.sum()) / len(captions), what)}


def markdown(report: dict) -> str:
    lines = [
        "| measured | foils per caption | foils whole (s) | from the difference on (s) | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["cases"].items():
        lines.append(
            f"| {name} | {r['foils_per_caption']} | {r['whole_foils_s']} | {r['from_the_difference_s']} | "
            f"{r['speedup']}x |"
        )
    lines += [
        "",
        f"Medians, alternating in {report['rounds']} rounds; float32; {machine_line(report['machine'])}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = step_bench_parser(__doc__, "bench/results/foil_prefix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cases = {name: demo_step(o, args, Path(tmp) / str(i)) for i, (name, o) in enumerate(CASES.items())}
    cases[f"text side, {TEXT_TOWER}, 8 foils of the same attributes"] = text_side(args)
    report = {"rounds": args.rounds, "cases": cases, "machine": machine()}
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
