"""A finetune.py run's results as leaderboard rows, read from what the run wrote, never recomputed.

finetune.py evaluates its model itself, through the same evaluation path as the probes, into
<run>/eval/metrics.json (and <run>/eval_ema/metrics.json for the EMA weights). A suite lists such
runs beside its models, so one table holds a frozen tower's probes and the same tower fine-tuned
with LoRA or fully: each run gives a row per evaluated weights, named by the suite entry and the
run's adaptation label (`demo · LoRA r=8`, `demo · LoRA r=8 (EMA)`), and one cell, column
`<benchmark>/finetune`. A run that has no results yet (still training, crashed, evaluate=false)
or a folder that is not a fine-tune gives a failed cell saying so, not a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flip.evaluation.leaderboard import CellResult

PROTOCOL = "finetune"
WEIGHTS = {"eval": "raw", "eval_ema": "ema"}  # the run's folder of each evaluated weights
UNKNOWN_COLUMN = ("finetune", "run")  # where a run with no readable results shows its error


@dataclass(frozen=True)
class FinetuneRow:
    """One leaderboard row of a fine-tune: its cell and the metrics.json it was read from."""

    cell: CellResult
    source: Path


def row_name(name: str, metrics: dict[str, Any]) -> str:
    """The entry's name, the adaptation label, and (EMA) for the averaged weights."""
    ema = " (EMA)" if metrics.get("weights") == "ema" else ""
    return f"{name} · {metrics['adaptation']['label']}{ema}"


def _read(path: Path) -> dict[str, Any]:
    """metrics.json of a fine-tune's evaluation; ValueError naming the file when it is not one."""
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err}); finetune.py writes it whole when it ends") from err
    if not isinstance(metrics, dict) or metrics.get("protocol") != PROTOCOL:
        found = metrics.get("protocol") if isinstance(metrics, dict) else type(metrics).__name__
        raise ValueError(
            f"{path} holds protocol {found!r}, not {PROTOCOL!r}: {path.parent.parent} is not a finetune.py "
            "run (list eval/*.py results under suite.models and suite.benchmarks instead)"
        )
    label = (metrics.get("adaptation") or {}).get("label")
    if not label or not metrics.get("benchmark") or metrics.get("weights") not in WEIGHTS.values():
        raise ValueError(
            f"{path} lacks the adaptation label, benchmark or weights (raw/ema) a finetune.py run "
            f"writes; found adaptation={metrics.get('adaptation')!r}, "
            f"benchmark={metrics.get('benchmark')!r}, weights={metrics.get('weights')!r}"
        )
    return metrics


def _missing(run: Path) -> str:
    """Why `run` has no eval/metrics.json, as far as its folder tells."""
    expected = run / "eval" / "metrics.json"
    if not run.is_dir():
        return (
            f"{run} does not exist: `run` must be a finetune.py run folder "
            f"(logs/finetune/runs/<date>/, holding eval/metrics.json)"
        )
    if not any((run / p).exists() for p in (".hydra", "checkpoints", "head.safetensors", "eval_ema")):
        return (
            f"{run} is not a finetune.py run folder: it has no eval/metrics.json, checkpoints/ or "
            ".hydra/ (give the folder finetune.py wrote, logs/finetune/runs/<date>/)"
        )
    return (
        f"{expected} does not exist: the fine-tune is still running, stopped before its end, or "
        "ran with evaluate=false (run finetune.py to its end with evaluate=true, or resume it with "
        "ckpt_path=auto)"
    )


def finetune_rows(name: str, run: str | Path) -> list[FinetuneRow]:
    """The rows of one run: its raw weights' and, when it has eval_ema/, its EMA weights'.
    A run without readable results is one failed row named `name`."""
    run = Path(run)
    raw = run / "eval" / "metrics.json"
    if not raw.is_file():
        return [FinetuneRow(CellResult(name, *UNKNOWN_COLUMN, error=_missing(run)), raw)]
    try:
        first = _read(raw)
    except ValueError as err:
        return [FinetuneRow(CellResult(name, *UNKNOWN_COLUMN, error=str(err)), raw)]
    rows = [FinetuneRow(CellResult(row_name(name, first), first["benchmark"], PROTOCOL, metrics=first), raw)]
    ema = run / "eval_ema" / "metrics.json"
    if ema.parent.is_dir():
        row = row_name(name, {**first, "weights": "ema"})
        try:
            if not ema.is_file():
                raise ValueError(
                    f"{ema} does not exist: the EMA weights' evaluation did not finish (finetune.py "
                    "writes it after eval/)"
                )
            metrics = _read(ema)
            rows.append(FinetuneRow(CellResult(row, metrics["benchmark"], PROTOCOL, metrics=metrics), ema))
        except ValueError as err:
            rows.append(FinetuneRow(CellResult(row, first["benchmark"], PROTOCOL, error=str(err)), ema))
    return rows
