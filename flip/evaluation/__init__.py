"""Evaluation: benchmark protocols (zero-shot, linear probe, token probe, retrieval), reports and queries.

`flip.evaluation.evaluate(model, benchmark, protocols, output_dir)` (run.py) is the one path
every caller takes: benchmark (reader, splits, prompts) -> features (extracted once per split,
optionally cached on disk) -> each protocol (zeroshot / linear_probe / token_probe / retrieval) -> report
(metrics.json, report.md, plots). attribute_query answers questions about images.
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "evaluate_config"]


def __getattr__(name: str) -> Any:
    # deferred: importing a light module of this package (metrics, prompts) should not load torch
    if name in __all__:
        from flip.evaluation import run

        return getattr(run, name)
    raise AttributeError(f"module 'flip.evaluation' has no attribute {name!r}")
