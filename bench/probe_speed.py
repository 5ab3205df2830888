"""Linear-probe speed: FLIP's torch probe vs scikit-learn LogisticRegression on the same features.

CelebA-sized synthetic cached features: 160,000 x 512 training features (float32), 40 binary
attributes with prevalences from 5% to 50%, each a thresholded linear function of the
features plus logistic label noise (so test accuracy lands near CelebA's ~0.9), and a 20,000-
sample test set. Both methods fit the same objective on the same standardised features:
one-vs-rest L2-regularised logistic regression, mean log-loss + l2/2 ||w||^2 per attribute
(scikit-learn's C = 1 / (l2 * n)), and both are scored by mean test accuracy over the 40
attributes. scikit-learn (lbfgs, default tol) fits one attribute after another, as its
one-vs-rest does; FLIP fits the 40 together (one [512, 40] weight matrix, L-BFGS).
The methods alternate within one run, so both see the same machine load.

    .venv/bin/python bench/probe_speed.py               # the table in bench/results/probe_speed.md
    .venv/bin/python bench/probe_speed.py --n 20000     # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_io import machine, write_results  # noqa: E402
from flip.evaluation.linear_probe import fit_logistic_regression, standardizer  # noqa: E402


def make_features(n: int, n_test: int, dim: int, labels: int, seed: int = 0):
    """Gaussian features; attribute a = [x . w_a + b_a + noise > 0], b_a set for 5-50% positives."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, labels)) / np.sqrt(dim) * 3.0
    prevalence = np.linspace(0.05, 0.5, labels)
    x = rng.normal(size=(n + n_test, dim)).astype(np.float32)
    scores = x @ w + rng.logistic(size=(n + n_test, labels))
    bias = -np.array([np.quantile(scores[:n, a], 1 - prevalence[a]) for a in range(labels)])
    y = (scores + bias > 0).astype(np.int8)
    return torch.from_numpy(x[:n]), y[:n], torch.from_numpy(x[n:]), y[n:]


def flip_probe(x: torch.Tensor, y: np.ndarray, x_test: torch.Tensor, l2: float, max_iter: int) -> np.ndarray:
    probe = fit_logistic_regression(x, torch.as_tensor(y), l2, multilabel=True, max_iter=max_iter)
    return probe.predict(x_test).numpy()


def sklearn_probe(
    x: torch.Tensor, y: np.ndarray, x_test: torch.Tensor, l2: float, max_iter: int
) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    mean, scale = standardizer(x)
    xs, xt = ((x - mean) / scale).numpy(), ((x_test - mean) / scale).numpy()
    c = 1.0 / (l2 * len(x))
    pred = np.zeros((len(xt), y.shape[1]), dtype=bool)
    for a in range(y.shape[1]):
        pred[:, a] = LogisticRegression(C=c, max_iter=max_iter).fit(xs, y[:, a]).predict(xt)
    return pred


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=160_000)
    parser.add_argument("--n-test", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--labels", type=int, default=40)
    parser.add_argument("--l2", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (flip, sklearn) timed")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both (torch and BLAS)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "probe_speed.json")
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy/scipy BLAS under scikit-learn: the same thread count
    load = [round(v, 2) for v in os.getloadavg()]
    x, y, x_test, y_test = make_features(args.n, args.n_test, args.dim, args.labels)
    times: dict[str, list[float]] = {"flip": [], "sklearn": []}
    cpu_times: dict[str, list[float]] = {"flip": [], "sklearn": []}
    accuracy: dict[str, float] = {}
    methods = {"flip": flip_probe, "sklearn": sklearn_probe}
    for round_index in range(args.rounds):
        for name, method in methods.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            pred = method(x, y, x_test, args.l2, args.max_iter)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            accuracy[name] = float((pred == y_test.astype(bool)).mean())
            print(
                f"round {round_index + 1}: {name} {times[name][-1]:.1f} s, mean accuracy {accuracy[name]:.4f}"
            )
    flip_s, sklearn_s = (float(np.median(times[m])) for m in ("flip", "sklearn"))
    flip_cpu, sklearn_cpu = (float(np.median(cpu_times[m])) for m in ("flip", "sklearn"))
    report = {
        "speedup": round(sklearn_s / flip_s, 2),
        "accuracy_diff_pt": round(100 * (accuracy["flip"] - accuracy["sklearn"]), 3),
        "flip_s": round(flip_s, 2),
        "sklearn_s": round(sklearn_s, 2),
        "flip_accuracy": round(accuracy["flip"], 5),
        "sklearn_accuracy": round(accuracy["sklearn"], 5),
        "speedup_cpu_time": round(sklearn_cpu / flip_cpu, 2),
        "times_s": {m: [round(t, 2) for t in v] for m, v in times.items()},
        "cpu_times_s": {m: [round(t, 2) for t in v] for m, v in cpu_times.items()},
        "shape": {"n_train": args.n, "n_test": args.n_test, "dim": args.dim, "labels": args.labels},
        "l2": args.l2,
        "sklearn_C": 1.0 / (args.l2 * args.n),
        "max_iter": args.max_iter,
        "baseline": "sklearn.linear_model.LogisticRegression(lbfgs, default tol), one fit per attribute",
        "time_method": f"median wall time over {args.rounds} alternating rounds, standardisation included "
        "(CPU time beside it: the machine may be shared)",
        "load_average_at_start": load,
        "machine": machine(),
    }
    header = "| features | labels | FLIP probe | scikit-learn | speedup | FLIP acc. | sklearn acc. | diff |"
    row = (
        f"| {args.n:,} x {args.dim} | {args.labels} | {flip_s:.1f} s | {sklearn_s:.1f} s "
        f"| {report['speedup']}x "
        f"| {accuracy['flip']:.4f} | {accuracy['sklearn']:.4f} | {report['accuracy_diff_pt']:+.2f} pt |"
    )
    note = (
        f"cpu {report['machine']['cpu']}, {report['machine']['threads']} threads, torch {torch.__version__}; "
        f"{report['time_method']}; load average {load}."
    )
    table = [header, "|---|---:|---:|---:|---:|---:|---:|---:|", row, "", note]
    write_results(args.out, report, "\n".join(table))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
