"""What `flip-data curate` decided, for people: `curation.json`, `curation.png` and one line per
removed sample in `curation_removed.jsonl`.

The JSON counts what each filter removed (in the order the filters run, zeros included for
every filter that ran, so "no duplicates" reads as 0 and not as a filter left out), the
histogram of agreement scores of every scored sample and of the kept ones, and each balancing
entry's count before and after. The plot shows the same histogram with the threshold in
effect, beside the removals per filter: enough to choose a threshold for the next run.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flip.atomic import atomic_file, atomic_write_text
from flip.curation.scan import Sample
from flip.curation.select import Filters, Selection
from flip.prepare.balance import Entry

__all__ = ["BINS", "PLOT_NAME", "REMOVED_NAME", "REPORT_NAME", "curation_report", "write_report"]

REPORT_NAME, PLOT_NAME, REMOVED_NAME = "curation.json", "curation.png", "curation_removed.jsonl"
BINS = 40
SCAN_REASONS = (
    "missing_image", "empty_image", "corrupt_image", "truncated_image", "decompression_bomb",
    "missing_caption", "empty_caption", "non_utf8_caption", "not_text_caption", "control_characters",
    "bad_json",
)  # fmt: skip
CAPTION_REASONS = (
    "caption_too_short",
    "caption_too_long",
    "caption_url",
    "caption_few_letters",
    "caption_repeats",
)


def _filter_reasons(filters: Filters, balanced: bool) -> list[str]:
    """The reasons of the filters that ran, in the order they ran."""
    reasons = list(CAPTION_REASONS)
    reasons += ["exact_duplicate"] if filters.dedup != "none" else []
    reasons += ["near_duplicate"] if filters.dedup == "near" else []
    reasons += ["embedding_duplicate"] if filters.min_embedding_cosine is not None else []
    if filters.min_agreement is not None or filters.keep_top_fraction is not None:
        reasons.append("low_agreement")
    if balanced:
        reasons.append("entry_full" if filters.balance_rule == "cap" else "entry_sampled_out")
        reasons += [] if filters.keep_unmatched else ["no_entry"]
    return reasons


def _histogram(scores: np.ndarray, kept: np.ndarray) -> dict[str, Any]:
    finite = np.isfinite(scores)
    values = scores[finite]
    edges = np.histogram_bin_edges(values, bins=BINS)
    quantiles = np.quantile(values, [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99])
    return {
        "scored": int(finite.sum()),
        "mean": round(float(values.mean()), 6),
        "quantiles": {
            f"p{q:02d}": round(float(v), 6)
            for q, v in zip((1, 5, 25, 50, 75, 95, 99), quantiles, strict=True)
        },
        "histogram": {
            "edges": [round(float(e), 6) for e in edges],
            "all": np.histogram(values, bins=edges)[0].tolist(),
            "kept": np.histogram(scores[finite & kept], bins=edges)[0].tolist(),
        },
    }


def curation_report(
    inputs: Sequence[Path],
    samples: Sequence[Sample],
    shard_problems: dict[str, int],
    selection: Selection,
    filters: Filters,
    scores: np.ndarray | None,
    model: str | None,
    entries: Sequence[Entry] | None,
    scan: dict[str, int],
) -> dict[str, Any]:
    """curation.json's content (see the module docstring)."""
    counts = Counter(r for r in selection.reasons if r is not None)
    filter_reasons = _filter_reasons(filters, entries is not None)
    removed = {r: counts[r] for r in SCAN_REASONS if counts[r]}
    removed.update({r: counts[r] for r in filter_reasons})
    removed.update({r: c for r, c in counts.items() if r not in removed})  # e.g. unscorable images
    kept = np.array([r is None for r in selection.reasons], dtype=bool)
    report: dict[str, Any] = {
        "inputs": [str(p) for p in inputs],
        "samples": {"read": len(samples), "kept": int(kept.sum()), "removed": int((~kept).sum())},
        "removed_by_filter": removed,
        "input_shard_problems": shard_problems,
        "filters": filters.to_json(),
        "scan": scan,
        "agreement": None,
        "balance": None,
        "files": {"plot": PLOT_NAME, "removed": REMOVED_NAME},
    }
    if scores is not None and np.isfinite(scores).any():
        report["agreement"] = {
            "model": model,
            "threshold": selection.threshold,
            "rule": "min_agreement"
            if filters.min_agreement is not None
            else "keep_top_fraction"
            if filters.keep_top_fraction is not None
            else None,
            **_histogram(scores, kept),
        }
    if entries is not None and selection.balance is not None:
        result = selection.balance
        report["balance"] = {
            "rule": result.rule,
            **result.settings,
            "unmatched": result.unmatched,
            "entries": {
                e.name: {"before": b, "after": a}
                for e, b, a in zip(entries, result.before, result.after, strict=True)
            },
        }
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agreement = report["agreement"]
    panels = 2 if agreement else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    if agreement:
        ax = axes[0][0]
        hist = agreement["histogram"]
        edges = np.asarray(hist["edges"])
        widths = np.diff(edges)
        ax.bar(edges[:-1], hist["all"], widths, align="edge", color="0.75", label="all scored")
        ax.bar(edges[:-1], hist["kept"], widths, align="edge", color="tab:blue", label="kept")
        if agreement["threshold"] is not None:
            ax.axvline(
                agreement["threshold"], color="tab:red", label=f"threshold {agreement['threshold']:.4f}"
            )
        ax.set(
            xlabel="image-text cosine", ylabel="samples", title=f"agreement ({agreement['scored']} scored)"
        )
        ax.legend()
    ax = axes[0][-1]
    removed = report["removed_by_filter"]
    names = list(removed)[::-1]
    ax.barh(names, [removed[n] for n in names], color="tab:orange")
    samples = report["samples"]
    ax.set(xlabel="samples removed", title=f"kept {samples['kept']} of {samples['read']}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    with atomic_file(path) as f:
        f.write(buffer.getvalue())


def write_report(
    output: Path,
    report: dict[str, Any],
    samples: Sequence[Sample],
    names: Sequence[str],
    selection: Selection,
) -> None:
    """Writes curation_removed.jsonl, curation.png and curation.json (last) into `output`."""
    with atomic_file(output / REMOVED_NAME) as f:
        for sample, name, reason, detail in zip(
            samples, names, selection.reasons, selection.details, strict=True
        ):
            if reason is not None:
                line = {"key": sample.key, "sample": name, "reason": reason, "detail": detail}
                f.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
    _plot(report, output / PLOT_NAME)
    # not sorted: removed_by_filter lists the filters in the order they ran
    atomic_write_text(output / REPORT_NAME, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
