"""Training throughput: FLIP's `train.py` (Lightning + Hydra) vs open_clip's own trainer.

Both train the same open_clip architecture (FLIP's `conf/model/tiny.yaml` without its
convolutional stem, `model.image_stem=null`, which open_clip cannot build; registered with
open_clip in both processes) with the CLIP loss on the same webdataset shards (resampled), at
the same batch size, the same number of threads, no data-loader workers, for the same number
of steps, on the CPU, at two precisions: fp32 on both sides, and bf16 with each side in its own
mixed-precision mode (FLIP `trainer.precision=bf16-mixed`, open_clip `--precision amp_bf16`:
both autocast to bf16 and keep fp32 weights). Each side keeps its own defaults otherwise,
checkpointing included (FLIP's last.ckpt and open_clip's end-of-epoch save both land after the
last step). The runs go in turn, `--rounds` times each, alternating which side and which
precision goes first, in fresh processes. A step is timed from the end of the previous one (data loading,
step, logging: everything), as open_clip times its batches; the first `--warmup` steps are
left out; samples/s is the batch over the median window of 10 steps (open_clip logs the mean
of each window). Both log every 10 steps.

The step's achieved GFLOP/s (FLOPs of one forward + backward, counted by
`torch.utils.flop_counter`, over FLIP's median step time at that precision) is set against this
machine's measured matmul GFLOP/s at the same precision and threads, for two shapes: the
model's largest matmul (the vision MLP's up-projection over the whole batch of tokens), a bound
the step could reach, and a large square one, the machine's peak. The same is measured for a
ViT-B/16 + BERT-base-sized step of FLIP's module at a small batch (`large_model_step`), where
the matrices are large enough for the matmul rate to be within reach.

FLIP's side runs the demo recipe's step, as `conf/experiment/demo.yaml` sets it for this model:
fused AdamW and, in bf16, the math attention kernel (`DEMO_ATTENTION_KERNELS`).

    .venv/bin/python bench/train_throughput.py
    .venv/bin/python bench/train_throughput.py --steps 20 --rounds 1   # quick check
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
from bench.results_io import machine, write_results  # noqa: E402

ARCH_NAME = "flip-bench-tiny"
LOG_EVERY = 10
# open_clip_train 3.3 groups tar members itself and fails on the end-of-shard marker webdataset
# 1.0 yields ({}: KeyError 'fname'); without the marker it reads shards as before webdataset 1.0.
OPEN_CLIP_LAUNCHER = (
    "import functools, sys, open_clip, open_clip_train.data as data; "
    "data.tar_file_expander = functools.partial(data.tar_file_expander, eof_value=None); "
    "open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; main(sys.argv[2:])"
)
# name -> FLIP's trainer.precision, open_clip's --precision, the dtype of the matmul it is set against
PRECISIONS = {
    "fp32": ("32-true", "fp32", torch.float32),
    "bf16": ("bf16-mixed", "amp_bf16", torch.bfloat16),
}
# the demo recipe's kernel choice for this model (conf/experiment/demo.yaml), which ~experiment drops
DEMO_ATTENTION_KERNELS = "{bf16-mixed: [math]}"
# ViT-B/16 image tower + a BERT-base-sized text transformer (12 x 768, 12 heads, 77 tokens), as
# an open_clip architecture: the size of FLIP's published model, without a tokenizer download;
# open_clip's batch-first attention block, as FLIP's configs choose it (conf/model/vit_b16_bert.yaml)
LARGE_ARCH_NAME = "flip-bench-vit-b16-bert-base"
LARGE_ARCH = {
    "embed_dim": 512,
    "vision_cfg": {
        "image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "mlp_ratio": 4.0,
        "block_type": "custom",
    },
    "text_cfg": {
        "context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12,
        "block_type": "custom",
    },
}  # fmt: skip
BATCH_TIME = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/.*?Batch \(t\): ([0-9.]+)")


def write_shards(directory: Path, count: int, per_shard: int, size: int, seed: int = 0) -> list[str]:
    """Noisy coloured JPEGs with short captions: decoding and augmentation cost like real images."""
    rng = random.Random(seed)
    words = ["a", "face", "with", "glasses", "smiling", "red", "hair", "beard", "hat", "old", "person"]
    directory.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard in range(count // per_shard):
        path = directory / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                noise = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8).numpy()
                image = Image.fromarray(noise)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                caption = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
                sink.write({"__key__": f"{shard:05d}{i:05d}", "jpg": buffer.getvalue(), "txt": caption})
        urls.append(str(path))
    return urls


def flip_overrides(args, shards: Path, work: Path, precision: str) -> list[str]:
    times = work / "flip_times.json"
    return [
        # open_clip cannot build the demo's convolutional stem: both sides train the plain ViT
        "~experiment", "model=tiny", "model.image_stem=null", f"model.name={ARCH_NAME}", "loss=clip",
        "trainer=cpu", "evaluate=false",
        "data=shards", f"data.train_shards={shards}", f"data.batch_size={args.batch}", "data.num_workers=0",
        "data.shuffle_buffer=1000", "data.samples_per_epoch=10000000", f"trainer.max_steps={args.steps}",
        f"trainer.precision={PRECISIONS[precision][0]}", f"trainer.log_every_n_steps={LOG_EVERY}",
        "optim.lr=1e-3", "optim.warmup_steps=5", f"hydra.run.dir={work}/flip-{precision}-{time.time_ns()}",
        f"attention_kernels={DEMO_ATTENTION_KERNELS}",
        f"paths.root_dir={work}",
        f"+callbacks.step_times={{_target_: flip.training.throughput.StepTimes, path: {times}}}",
    ]  # fmt: skip


def run_flip(args, shards: Path, work: Path, threads: int, precision: str) -> list[float]:
    overrides = flip_overrides(args, shards, work, precision)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "FLIP_ROOT": str(work)}
    done = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"train.py at {precision} failed:\n{done.stderr[-3000:]}")
    return json.loads((work / "flip_times.json").read_text())["step_seconds"]


def open_clip_argv(args, shards: list[str], work: Path, precision: str) -> list[str]:
    """open_clip's defaults but for what both sides must share; its checkpoint at the epoch's end stays on."""
    first, last = Path(shards[0]).stem, Path(shards[-1]).stem
    return [
        "--model", ARCH_NAME, "--train-data", str(Path(shards[0]).parent / f"{{{first}..{last}}}.tar"),
        "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(args.steps * args.batch),
        "--batch-size", str(args.batch), "--epochs", "1", "--workers", "0", "--device", "cpu",
        "--precision", PRECISIONS[precision][1], "--lr", "1e-3", "--wd", "0.1", "--warmup", "5",
        "--seed", "42", "--log-every-n-steps", str(LOG_EVERY), "--report-to", "",
        "--logs", str(work / "open_clip_logs"), "--name", f"bench-{precision}-{time.time_ns()}",
    ]  # fmt: skip


def run_open_clip(
    args, shards: list[str], arch_json: Path, work: Path, threads: int, precision: str
) -> list[float]:
    """Per-step times from open_clip's log: `Batch (t)` is the mean over the steps since the last line."""
    argv = open_clip_argv(args, shards, work, precision)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-c", OPEN_CLIP_LAUNCHER, str(arch_json), *argv],
        cwd=work, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"open_clip_train at {precision} failed:\n{done.stderr[-3000:]}")
    steps, previous = [], 0
    for samples, mean in BATCH_TIME.findall(done.stdout + done.stderr):
        count = int(samples) // args.batch
        steps += [float(mean)] * (count - previous)
        previous = count
    if len(steps) != args.steps:
        raise RuntimeError(f"parsed {len(steps)} step times from open_clip's log, expected {args.steps}")
    return steps


def samples_per_second(step_seconds: list[float], batch: int, warmup: int) -> float:
    """Batch over the median of the mean step time of each logging window after warm-up.

    open_clip reports one mean per window of LOG_EVERY steps, so both are cut the same way; the
    median keeps a burst of load from another process on a shared machine out of the result.
    """
    timed = step_seconds[warmup:]
    windows = [timed[i : i + LOG_EVERY] for i in range(0, len(timed), LOG_EVERY)]
    return batch / statistics.median(sum(w) / len(w) for w in windows)


def step_flops(arch: dict, batch: int) -> int:
    """FLOPs of one forward + backward of both towers and the loss at this batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT))
    from flip.losses import ClipLoss
    from flip.models import build_model

    model = build_model(ARCH_NAME, arch)
    size = arch["vision_cfg"]["image_size"]
    images = torch.randn(batch, 3, size, size)
    text = model.tokenize(["a face with glasses and a red hat, smiling"] * batch)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(images, text)
        loss = ClipLoss()(out.image_features, out.text_features, out.logit_scale)
        loss.backward()
    return counter.get_total_flops()


def large_model_step(precision: str, batch: int, steps: int, threads: int, warmup: int) -> dict:
    """Median seconds and FLOPs of FLIP's training step at ViT-B/16 + BERT-base size, at one precision.

    The step the Lightning module runs (forward, CLIP loss, backward, the recipe's fused AdamW
    step), driven directly: at this size a step takes seconds on a CPU, so a few steps measure
    it, and data loading (a 224 px JPEG decode per sample) is a small, separate cost. bf16 is
    autocast with float32 weights, as `trainer.precision=bf16-mixed`; attention kernels are
    torch's own choice, the faster one at this sequence length (docs/training.md).
    """
    from contextlib import nullcontext

    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT))
    from flip.training.module import FlipLitModule
    from flip.training.optim import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    optim = yaml.safe_load((ROOT / "conf" / "optim" / "adamw.yaml").read_text())
    loss = yaml.safe_load((ROOT / "conf" / "loss" / "clip.yaml").read_text())
    module = FlipLitModule({"name": LARGE_ARCH_NAME, "pretrained": None, "arch": LARGE_ARCH}, loss, optim)
    optimizer = build_optimizer(module.model, optim)
    images = torch.randn(batch, 3, 224, 224)
    text = module.model.tokenize(["a smiling woman with long dark hair, earrings and red lipstick"] * batch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step() -> None:
        with autocast:
            losses = module.criterion(module(images, text))
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    for _ in range(warmup):  # the allocator settles over the first steps, as in a run's first steps
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "flops": counter.get_total_flops(), "step_seconds": times}


def large_model(args) -> dict:
    """The ViT-B/16 + BERT-base-sized step at both precisions, each against matmul at its precision."""
    vision = LARGE_ARCH["vision_cfg"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    shape = (args.large_batch * tokens, vision["width"], int(vision["width"] * vision["mlp_ratio"]))
    out = {
        "arch": LARGE_ARCH,
        "batch": args.large_batch,
        "timed_steps": args.large_steps,
        "left_out_steps": 1 + args.large_warmup,
        "matmul_shape_mkn": shape,
        "precisions": {},
    }
    for precision, (_, _, dtype) in PRECISIONS.items():
        step = large_model_step(
            precision, args.large_batch, args.large_steps, args.threads, args.large_warmup
        )
        step_gflops = step["flops"] / step["seconds"] / 1e9
        matmul = matmul_gflops(args.threads, shape, dtype)
        out["step_gflop"] = round(step["flops"] / 1e9, 1)
        out["precisions"][precision] = {
            "step_seconds": round(step["seconds"], 3),
            "step_seconds_each": [round(t, 3) for t in step["step_seconds"]],
            "samples_per_s": round(args.large_batch / step["seconds"], 2),
            "step_gflops": round(step_gflops, 1),
            "matmul_gflops": round(matmul, 1),
            "step_vs_matmul": round(step_gflops / matmul, 3),
        }
        print(f"ViT-B/16 + BERT-base {precision}: {out['precisions'][precision]}", flush=True)
    return out


def matmul_shapes(arch: dict, batch: int) -> dict[str, tuple[int, int, int]]:
    """(m, k, n) of the model's largest matmul and of a large square one.

    The vision MLP's up-projection over all tokens of the batch is the step's largest matmul;
    its k (the width) is small, which caps what any kernel gets out of it.
    """
    vision = arch["vision_cfg"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    width = vision["width"]
    return {"model": (batch * tokens, width, int(width * vision["mlp_ratio"])), "large": (2048, 2048, 2048)}


def matmul_gflops(threads: int, shape: tuple[int, int, int], dtype: torch.dtype, repeats: int = 10) -> float:
    """Best of `repeats` plain `a @ b` in `dtype`: what autocast hands the CPU kernels at that precision."""
    torch.set_num_threads(threads)
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out (compilation, caches)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--samples", type=int, default=2048, help="samples in the generated shards")
    parser.add_argument("--large-batch", type=int, default=16, help="batch of the ViT-B/16 + BERT-base step")
    parser.add_argument("--large-steps", type=int, default=8, help="timed steps of it, after those left out")
    parser.add_argument("--large-warmup", type=int, default=2, help="its steps left out after the first")
    args = parser.parse_args()
    if args.warmup % LOG_EVERY or args.steps % LOG_EVERY:
        parser.error(
            f"--warmup and --steps must be multiples of {LOG_EVERY} (open_clip logs every {LOG_EVERY})"
        )

    arch = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())["arch"]
    work = Path(tempfile.mkdtemp(prefix="flip-bench-"))
    arch_json = work / f"{ARCH_NAME}.json"
    arch_json.write_text(json.dumps(arch))
    print(f"writing {args.samples} samples of shards to {work}", flush=True)
    shards = write_shards(work / "shards", args.samples, 256, size=112)

    load_before = os.getloadavg()[0]
    runs = {p: {"flip": [], "open_clip": []} for p in PRECISIONS}
    sides, precisions = ["flip", "open_clip"], list(PRECISIONS)
    for round_ in range(args.rounds):
        for precision in precisions if round_ % 2 == 0 else precisions[::-1]:
            for name in sides if round_ % 2 == 0 else sides[::-1]:
                start = time.perf_counter()
                if name == "flip":
                    steps = run_flip(args, work / "shards", work, args.threads, precision)
                else:
                    steps = run_open_clip(args, shards, arch_json, work, args.threads, precision)
                rate = samples_per_second(steps, args.batch, args.warmup)
                runs[precision][name].append(rate)
                print(
                    f"round {round_ + 1} {precision} {name:9s} {rate:7.1f} samples/s "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )

    flops = step_flops(arch, args.batch)
    shapes = matmul_shapes(arch, args.batch)
    result: dict = {"step_gflop": round(flops / 1e9, 2)}
    by_precision = {}
    for precision, (_, _, dtype) in PRECISIONS.items():
        flip_rate = statistics.median(runs[precision]["flip"])
        open_clip_rate = statistics.median(runs[precision]["open_clip"])
        step_gflops = flops / (args.batch / flip_rate) / 1e9
        matmul = {k: matmul_gflops(args.threads, shape, dtype) for k, shape in shapes.items()}
        result[f"ratio_{precision}"] = round(flip_rate / open_clip_rate, 3)
        by_precision[precision] = {
            "flip_samples_per_s": round(flip_rate, 2),
            "open_clip_samples_per_s": round(open_clip_rate, 2),
            "ratio": round(flip_rate / open_clip_rate, 3),
            "step_gflops": round(step_gflops, 2),
            "matmul_gflops": {k: round(v, 2) for k, v in matmul.items()},
            "step_vs_matmul": {k: round(step_gflops / v, 3) for k, v in matmul.items()},
            "runs_samples_per_s": {k: [round(v, 2) for v in rates] for k, rates in runs[precision].items()},
        }
    result["step_vs_matmul"] = {p: r["step_vs_matmul"] for p, r in by_precision.items()}
    result["precisions"] = by_precision
    result["large_model"] = large_model(args)
    result["step_vs_matmul_by_model"] = {
        "tiny": {p: r["step_vs_matmul"]["model"] for p, r in by_precision.items()},
        "vit_b16_bert_base": {p: r["step_vs_matmul"] for p, r in result["large_model"]["precisions"].items()},
    }
    placeholder = {str(work): "<work>", str(ROOT): "<repo>"}

    def shown(argv: list[str]) -> list[str]:
        for path, name in placeholder.items():
            argv = [a.replace(path, name) for a in argv]
        return [re.sub(r"-\d{15,}$", "-<ns>", a) for a in argv]  # each run's own folder

    result["settings"] = {
        "flip": {
            "command": "OMP_NUM_THREADS=<threads> python train.py <overrides>",
            "overrides": {p: shown(flip_overrides(args, work / "shards", work, p)) for p in PRECISIONS},
        },
        "open_clip": {
            "command": "OMP_NUM_THREADS=<threads> python -c <OPEN_CLIP_LAUNCHER> <arch json> <argv>",
            "argv": {p: shown(open_clip_argv(args, shards, work, p)) for p in PRECISIONS},
        },
    }  # fmt: skip
    result["config"] = {
        "arch": "conf/model/tiny.yaml, no stem (ViT 64px/8, width 96, 3 layers; text 96 x 2 layers; 128-d)",
        "loss": "clip (the demo recipe, conf/experiment/demo.yaml, trains clip_filip)",
        "batch": args.batch,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "precisions": {p: {"flip": f, "open_clip": o} for p, (f, o, _) in PRECISIONS.items()},
        "threads": args.threads,
        "loader_workers": 0,
        "log_every_n_steps": LOG_EVERY,
        "image_px_in_shards": 112,
        "matmul_shapes_mkn": shapes,
    }
    result["machine"] = machine()
    result["machine"]["load_average_1min_before"] = round(load_before, 2)
    write_results(RESULTS / "train_throughput", result, markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    c = r["config"]
    model, large = (c["matmul_shapes_mkn"][k] for k in ("model", "large"))
    rows = "".join(
        f"| {p} | {c['batch']} | {c['steps']} ({c['steps'] - c['warmup_steps']}) | {c['threads']} | "
        f"{x['flip_samples_per_s']} samples/s | {x['open_clip_samples_per_s']} samples/s | {x['ratio']} | "
        f"{r['step_gflop']} | {x['step_gflops']} | {x['matmul_gflops']['model']} / "
        f"{x['matmul_gflops']['large']} | {x['step_vs_matmul']['model']} / {x['step_vs_matmul']['large']} |\n"
        for p, x in r["precisions"].items()
    )
    medians = "; ".join(
        f"{p}: FLIP {x['runs_samples_per_s']['flip']}, open_clip {x['runs_samples_per_s']['open_clip']}"
        for p, x in r["precisions"].items()
    )
    modes = ", ".join(
        f"{p}: FLIP `{s['flip']}`, open_clip `{s['open_clip']}`" for p, s in c["precisions"].items()
    )
    return (
        "| precision | batch | steps (timed) | threads | FLIP train.py | open_clip_train | ratio | "
        "step GFLOP | step GFLOP/s | matmul GFLOP/s (model / large) | step / matmul (model / large) |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
        f"{rows}\n"
        f"Medians of {c['rounds']} alternating runs each ({medians} samples/s). {c['arch']}; "
        f"CLIP loss only (the demo recipe trains CLIP + FILIP); modes {modes}; no loader workers, both "
        f"logging every {c['log_every_n_steps']} steps and saving a checkpoint after the last step. "
        f"Matmul at the step's precision: the model's largest ({model[0]}x{model[1]} @ "
        f"{model[1]}x{model[2]}) and a large one ({large[0]}x{large[1]} @ {large[1]}x{large[2]}); "
        "step FLOPs counted once "
        f"(the same at both precisions). {r['machine']['cpu']}, torch {r['machine']['torch']}, "
        f"{r['machine']['cores']} cores, 1-min load average before/after "
        f"[{r['machine']['load_average_1min_before']}, {r['machine']['load_average_1min']}].\n"
        f"{large_markdown(r['large_model'])}"
    )


def large_markdown(large: dict) -> str:
    rows = "".join(
        f"| {p} | {large['batch']} | {x['step_seconds']} s | {large['step_gflop']} | {x['step_gflops']} | "
        f"{x['matmul_gflops']} | {x['step_vs_matmul']} |\n"
        for p, x in large["precisions"].items()
    )
    m, k, n = large["matmul_shape_mkn"]
    return (
        "\nViT-B/16 + BERT-base-sized step (FLIP's module: forward, CLIP loss, backward, fused AdamW; "
        f"random 224 px images, 77-token captions; median of {large['timed_steps']} steps after "
        f"{large['left_out_steps']} left out), against the matmul of "
        f"its vision MLP ({m}x{k} @ {k}x{n}) at the same precision:\n\n"
        "| precision | batch | step | step GFLOP | step GFLOP/s | matmul GFLOP/s | step / matmul |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        f"{rows}"
    )


if __name__ == "__main__":
    main()
