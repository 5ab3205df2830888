"""The one command a CUDA machine runs to check FLIP's GPU paths, within minutes on one GPU.

CI and the development machines have no GPU, so everything here is what their tests can only
simulate: bf16 autocast on CUDA, FILIP's chunked kernel on CUDA, DeepSpeed ZeRO-2/3 through
train.py with a resume, torch.compile, and how close a ViT-B/16 + BERT-base step comes to the
GPU's own bf16 matmul rate. Each check runs on its own (one failing check is recorded and the
others still run) and everything lands in `bench/results/gpu_check.json` and `.md`, rewritten
after each check.

    make gpu-check                                   # = .venv/bin/python bench/gpu_check.py
    .venv/bin/python bench/gpu_check.py --only filip matmul
    .venv/bin/python bench/gpu_check.py --only zero2 zero3 --keep-others   # rerun two, keep the rest

Without CUDA it prints one line saying so and exits 0 at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench.results_io import write_results  # noqa: E402

# The tiny demo model on FaceShapes, as the tests shrink it: enough to exercise a strategy.
SMALL_RUN = [
    "evaluate=false",
    "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=5",
    "callbacks.model_checkpoint.every_n_train_steps=10",
    "data.num_workers=4",
    "~callbacks.progress_bar",
]


def matmul_tflops(dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """Dense n x n x n matmul rate on the current GPU: the ceiling a training step is set against."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def check_matmul() -> dict:
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = matmul_tflops(torch.float32, repeats=5)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = matmul_tflops(torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return {
        "bf16_tflops": round(matmul_tflops(torch.bfloat16), 1),
        "tf32_tflops": round(tf32, 1),
        "fp32_tflops": round(fp32, 1),
        "ok": True,
    }


def check_filip(batch: int = 64, n_img: int = 197, n_txt: int = 32, dim: int = 256) -> dict:
    """Chunked FILIP on CUDA equals the dense reference, values and gradients, under bf16 autocast.

    The towers produce bf16 tokens under autocast and the loss runs in float32 (as
    `CombinedLoss` does), so the two implementations are compared on the same bf16-born inputs.
    """
    from filip_memory import chunked_loss, make_inputs, naive_loss

    results = {}
    for name, loss_fn in (("dense", naive_loss), ("chunked", chunked_loss(chunk_size=16))):
        image, text, mask, scale = make_inputs(batch, n_img, n_txt, dim)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            # tokens as the towers hand them over (bf16), then upcast where the loss starts
            leaves = [t.detach().cuda().bfloat16().float().requires_grad_() for t in (image, text)]
            leaves.append(scale.detach().cuda().requires_grad_())
            with torch.autocast("cuda", enabled=False):
                loss = loss_fn(leaves[0], leaves[1], mask.cuda(), leaves[2])
        loss.backward()
        torch.cuda.synchronize()
        results[name] = (loss.detach(), [t.grad for t in leaves])
    (dense_loss, dense_grads), (chunked_loss_value, chunked_grads) = results["dense"], results["chunked"]
    loss_diff = (dense_loss - chunked_loss_value).abs().item()
    grad_diff = max((a - b).abs().max().item() for a, b in zip(dense_grads, chunked_grads, strict=True))
    return {
        "shape": {"batch": batch, "image_tokens": n_img, "text_tokens": n_txt, "dim": dim},
        "loss": round(dense_loss.item(), 6),
        "max_abs_diff_loss": loss_diff,
        "max_abs_diff_grad": grad_diff,
        "ok": loss_diff <= 1e-4 and grad_diff <= 1e-4,
    }


def train_py(overrides: list[str], run_dir: Path, data_dir: Path, timeout: int) -> tuple[float, str]:
    """`python train.py OVERRIDES` in its own process; (seconds, run folder) or an error with stderr.

    The demo's `attention_kernels` is its CPU choice (math in bf16); on the GPU torch's own is used.
    """
    command = [
        sys.executable, "train.py", *overrides, "attention_kernels=null",
        f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def last_logged(run_dir: Path, column: str) -> float | None:
    """The last value of `column` in the run's CSV log."""
    import csv

    values = []
    for path in run_dir.glob("csv/version_*/metrics.csv"):
        with open(path) as handle:
            values += [float(row[column]) for row in csv.DictReader(handle) if row.get(column)]
    return values[-1] if values else None


def check_demo(work: Path) -> dict:
    """The quick-start recipe in bf16 on one GPU, evaluated as on the CPU."""
    run = work / "demo"
    seconds, _ = train_py(["trainer=gpu", "data.num_workers=8"], run, work / "data", timeout=900)
    zero_shot = json.loads((run / "eval" / "metrics.json").read_text())["summary"]
    probe = json.loads((run / "eval" / "linear_probe" / "metrics.json").read_text())["summary"]
    return {
        "seconds": round(seconds, 1),
        "zeroshot_mean_balanced_accuracy": zero_shot.get("mean_balanced_accuracy"),
        "linear_probe_mean_balanced_accuracy": probe.get("mean_balanced_accuracy"),
        "ok": True,
    }


def check_deepspeed(work: Path, stage: int) -> dict:
    """ZeRO-`stage` for 20 steps through train.py, then a resume from its checkpoint to step 30."""
    run = work / f"zero{stage}"
    strategy = [f"trainer=deepspeed_zero{stage}", "trainer.devices=1", *SMALL_RUN]
    first, _ = train_py([*strategy, "trainer.max_steps=20"], run, work / "data", timeout=600)
    checkpoint = run / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise RuntimeError(f"ZeRO-{stage} wrote no {checkpoint}")
    resumed_run = work / f"zero{stage}_resumed"
    second, _ = train_py(
        [*strategy, "trainer.max_steps=30", f"ckpt_path={checkpoint}"],
        resumed_run,
        work / "data",
        timeout=600,
    )
    loss = last_logged(resumed_run, "train/loss")
    return {
        "first_20_steps_seconds": round(first, 1),
        "resume_to_30_seconds": round(second, 1),
        "loss_after_resume": loss,
        "ok": loss is not None and loss == loss,
    }


def check_compile(work: Path) -> dict:
    run = work / "compiled"
    seconds, _ = train_py(
        ["trainer=gpu", "compile=true", "trainer.max_steps=100", *SMALL_RUN], run, work / "data", timeout=600
    )
    loss = last_logged(run, "train/loss")
    return {"seconds_incl_compile": round(seconds, 1), "final_loss": loss, "ok": loss is not None}


def check_step_mfu(batch: int = 64, steps: int = 20) -> dict:
    """A ViT-B/16 + BERT-base training step (bf16 autocast, AdamW) against the bf16 matmul peak.

    BERT-base is built from `transformers.BertConfig()` (its defaults are BERT-base) with random
    weights: nothing is downloaded on a machine that may have no network.
    """
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel

    from flip.losses.clip import symmetric_cross_entropy

    image_tower = open_clip.create_model("ViT-B-16").visual
    text_tower = BertModel(BertConfig(), add_pooling_layer=False)
    text_projection = torch.nn.Linear(768, image_tower.output_dim, bias=False)
    modules = torch.nn.ModuleList([image_tower, text_tower, text_projection]).cuda()
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    tokens = torch.randint(1000, 30000, (batch, 65), device="cuda")
    labels = torch.arange(batch, device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            image_features = torch.nn.functional.normalize(image_tower(images), dim=-1)
            cls = text_tower(input_ids=tokens).last_hidden_state[:, 0]
            text_features = torch.nn.functional.normalize(text_projection(cls), dim=-1)
        logits = 100 * image_features.float() @ text_features.float().T
        symmetric_cross_entropy(logits, logits.T, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = matmul_tflops(torch.bfloat16)
    achieved = flops / seconds / 1e12
    return {
        "batch": batch,
        "step_seconds": round(seconds, 4),
        "samples_per_second": round(batch / seconds, 1),
        "step_tflops": round(achieved, 1),
        "bf16_matmul_tflops": round(peak, 1),
        "mfu_vs_bf16_matmul": round(achieved / peak, 3),
        "ok": True,
    }


def run_checks(checks: dict[str, Callable[[], dict]], on_result: Callable[[dict[str, dict]], None]) -> None:
    """Run each check in turn; `on_result` sees the results so far after each one, so a run cut
    short (a lease ending, a hung strategy) keeps what it measured."""
    results: dict[str, dict] = {}
    for name, check in checks.items():
        print(f"[gpu-check] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            results[name] = check()
        except Exception as exc:  # one broken path must not hide the others' results
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-4000:]}
            traceback.print_exc()
        results[name]["check_seconds"] = round(time.perf_counter() - start, 1)
        print(f"[gpu-check] {name}: {'ok' if results[name]['ok'] else 'FAILED'}", flush=True)
        on_result(results)


def markdown(report: dict) -> str:
    lines = [
        f"GPU check on {report['device']} (torch {report['torch']}), {report['date']}",
        "",
        "| check | ok | figures |",
        "|---|---|---|",
    ]
    for name, result in report["checks"].items():
        figures = ", ".join(f"{k}={v}" for k, v in result.items() if k not in ("ok", "error"))
        error = result.get("error", "")
        first_error_line = error.splitlines()[0][:200] if error else ""
        lines.append(f"| {name} | {'yes' if result['ok'] else 'NO'} | {figures or first_error_line} |")
    return "\n".join(lines) + "\n"


def kept_results(previous: Path, report: dict, rerun: set[str]) -> dict[str, dict]:
    """The checks of an earlier report that this run does not redo, each marked with its date.

    Only a report from the same device and torch is merged: figures from another machine beside
    this one's would read as one machine's.
    """
    if not previous.exists():
        return {}
    earlier = json.loads(previous.read_text())
    same = all(earlier.get(key) == report[key] for key in ("device", "torch", "cuda"))
    if not same:
        raise SystemExit(
            f"--keep-others: {previous} is from {earlier.get('device')} / torch {earlier.get('torch')}, "
            f"this run is on {report['device']} / torch {report['torch']}; rerun every check instead"
        )
    return {
        name: {**result, "date": result.get("date", earlier.get("date"))}
        for name, result in earlier.get("checks", {}).items()
        if name not in rerun
    }


def main(argv: list[str] | None = None) -> int:
    names = ["matmul", "filip", "step_mfu", "step_mfu_b256", "demo", "zero2", "zero3", "compile"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=names, help="run only these checks")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for gpu_check.json and .md (default: bench/results)"
    )
    parser.add_argument(
        "--keep-others",
        action="store_true",
        help="with --only: keep the other checks' results from the report already in --out (a rerun of "
        "the checks that failed, on a machine of the same device and torch)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch; nothing to check on this machine")
        return 0
    with tempfile.TemporaryDirectory(prefix="flip-gpu-check-") as scratch:
        work = args.work or Path(scratch)
        checks = {
            "matmul": check_matmul,
            "filip": check_filip,
            "step_mfu": check_step_mfu,
            "step_mfu_b256": lambda: check_step_mfu(batch=256),  # large enough for the GPU's rate
            "demo": lambda: check_demo(work),
            "zero2": lambda: check_deepspeed(work, 2),
            "zero3": lambda: check_deepspeed(work, 3),
            "compile": lambda: check_compile(work),
        }
        selected = {name: checks[name] for name in (args.only or names)}
        report = {
            "device": torch.cuda.get_device_name(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
            "checks": {},
        }
        kept = kept_results(args.out / "gpu_check.json", report, set(selected)) if args.keep_others else {}

        def save(results: dict[str, dict]) -> None:
            merged = {**kept, **results}
            report["checks"] = {name: merged[name] for name in names if name in merged}
            write_results(args.out / "gpu_check", report, markdown(report))

        run_checks(selected, on_result=save)
    print(markdown(report))
    failed = [name for name, result in report["checks"].items() if not result["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
