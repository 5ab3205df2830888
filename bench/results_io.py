"""What every bench writes beside its figures, and how: one description of the machine, and the
results as JSON plus a Markdown table, each written whole.

A ratio measured on a shared 2-core machine means little without the CPU (bf16 kernels differ by
more than clock speed), the thread count and the load the run met, so every bench records the
same block; and a bench killed while writing must not leave half a results file that a later
reader takes for the result.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from flip.atomic import atomic_write_text


def cpu_model() -> str:
    """The CPU's model name and its native bf16 flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", info, flags=re.M)
    flags = sorted({f for f in ("avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", info)})
    return f"{name.group(1) if name else platform.machine()} ({', '.join(flags) or 'no native bf16'})"


def machine(threads: int | None = None, **versions: str) -> dict[str, Any]:
    """The machine block of a bench's JSON: CPU, cores, the threads the measured work ran on
    (`threads`, for a bench whose workers set their own; default this process's), versions (torch,
    python, and any the bench names, e.g. open_clip=open_clip.__version__) and the 1-minute load
    average when it is written."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **versions,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """The `machine` block as a Markdown table's footnote reads it."""
    return (
        f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
        f"1-min load average {machine['load_average_1min']}"
    )


def write_results(stem: str | os.PathLike, report: dict[str, Any], markdown: str | None = None) -> None:
    """<stem>.json (the report) and, when given, <stem>.md (the table), each replaced atomically."""
    stem = Path(stem)
    if stem.suffix in (".json", ".md"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    if markdown is not None:
        atomic_write_text(stem.with_suffix(".md"), markdown if markdown.endswith("\n") else markdown + "\n")
