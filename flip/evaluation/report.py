"""What an evaluation leaves behind: metrics.json, report.md, PNG plots and a console table.

metrics.json is the machine-readable result (one schema for every protocol); report.md and
the plots are for people, and carry every label rather than only the mean, so that a
regression on one attribute cannot hide behind an average.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def _label_rows(metrics: Mapping[str, Any], per_label: Mapping[str, Mapping]) -> tuple[list[str], list[list]]:
    if metrics["task"] == "attributes":
        header = ["attribute", "accuracy", "balanced accuracy", "support", "positives"]
        rows = [
            [n, m["accuracy"], m["balanced_accuracy"], m["support"], m.get("positives", "")]
            for n, m in per_label.items()
        ]
    else:
        header = ["class", "recall", "support"]
        rows = [[n, m["recall"], m["support"]] for n, m in per_label.items()]
    return header, rows


# -- plots -------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state: safe in any process

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_label_bars(
    series: Mapping[str, Mapping[str, float]], path: Path, xlabel: str, title: str, chance: float | None
) -> Path:
    """Horizontal bars per label, one colour per series (e.g. per few-shot fraction)."""
    labels = list(next(iter(series.values())))
    fig = _figure(7.0, 1.2 + 0.28 * len(labels) * max(1, len(series) * 0.6))
    ax = fig.subplots()
    height = 0.8 / len(series)
    y = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.barh(y + i * height, [values[label] for label in labels], height, label=name)
    ax.set_yticks(y + height * (len(series) - 1) / 2, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if chance is not None:
        ax.axvline(chance, color="gray", linestyle="--", linewidth=1)
    if len(series) > 1:
        ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path)
    return path


def plot_confusion(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str
) -> Path:
    """Row-normalised confusion matrix (rows: true class) with the counts written in the cells."""
    counts = np.asarray(confusion, dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.55 * len(classes)
    fig = _figure(size + 1, size)
    ax = fig.subplots()
    image = ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            color = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.savefig(path)
    return path


def write_plots(metrics: Mapping[str, Any], output_dir: Path) -> list[Path]:
    """per_label.png (bars), confusion_matrix.png and confusion_<question>.png where they apply."""
    title = f"{metrics['protocol']} · {metrics['benchmark']} · {metrics['split']}"
    task, paths = metrics["task"], []
    key, chance = ("balanced_accuracy", 0.5) if task == "attributes" else ("recall", None)
    if task == "retrieval":
        summary = metrics["summary"]
        series = {"recall": {k: v for k, v in summary.items()}}
        paths.append(plot_label_bars(series, output_dir / "recalls.png", "recall", title, None))
    elif metrics.get("fractions"):
        series = {
            f"{float(f):.0%} labels": {n: m[key] for n, m in block["per_label"].items()}
            for f, block in metrics["fractions"].items()
        }
        paths.append(
            plot_label_bars(series, output_dir / "per_label.png", key.replace("_", " "), title, chance)
        )
    elif metrics["per_label"]:
        series = {metrics["protocol"]: {n: m[key] for n, m in metrics["per_label"].items()}}
        paths.append(
            plot_label_bars(series, output_dir / "per_label.png", key.replace("_", " "), title, chance)
        )
    if "confusion_matrix" in metrics:
        paths.append(
            plot_confusion(
                metrics["confusion_matrix"], metrics["labels"], output_dir / "confusion_matrix.png", title
            )
        )
    for question, m in metrics.get("multiclass", {}).items():
        if "confusion_matrix" in m:
            path = output_dir / f"confusion_{question}.png"
            paths.append(
                plot_confusion(m["confusion_matrix"], list(m["per_class"]), path, f"{question} · {title}")
            )
    return paths


# -- report ------------------------------------------------------------------------------------


def _beside_as_published(metrics: Mapping[str, Any]) -> list[str]:
    """The honest summary and, beside it under its label, the figure selected on the test set."""
    published = metrics["as_published"]
    selected = metrics.get("selected") or {}
    honest = "honest" + (
        f" (epoch {selected['epoch']}, chosen on {selected['on']})" if "epoch" in selected else ""
    )
    label = published["label"] + (
        f" (epoch {published['selected']['epoch']})" if "epoch" in published.get("selected", {}) else ""
    )
    rows = [[k.replace("_", " "), v, published["summary"].get(k, "")] for k, v in metrics["summary"].items()]
    return [*_md_table(["metric", honest, label], rows), ""]


def _markdown(metrics: Mapping[str, Any], plots: Sequence[Path]) -> str:
    counts = f"n={metrics['n_test']}" + (f", n_train={metrics['n_train']}" if metrics.get("n_train") else "")
    lines = [
        f"# {metrics['protocol']} on {metrics['benchmark']} ({metrics['split']}, {counts})",
        "",
        f"checkpoint: `{metrics.get('checkpoint')}`",
        "",
    ]
    summary = metrics["summary"]
    if metrics.get("fractions"):
        names = list(summary)
        rows = [
            [
                f"{block['fraction']:.0%} ({block['n_train']})",
                f"{block['l2']:g}",
                *[block["summary"][n] for n in names],
            ]
            for block in metrics["fractions"].values()
        ]
        lines += _md_table(["train labels", "l2", *[n.replace("_", " ") for n in names]], rows)
        lines += ["", f"l2 chosen on: {next(iter(metrics['fractions'].values()))['l2_selected_on']}", ""]
    elif metrics.get("as_published"):
        lines += _beside_as_published(metrics)
    else:
        lines += _md_table(["metric", "value"], [[k.replace("_", " "), v] for k, v in summary.items()])
        lines.append("")
    if metrics["per_label"]:
        header, rows = _label_rows(metrics, metrics["per_label"])
        if metrics.get("fractions"):
            lines.append(
                f"Per label, {next(reversed(metrics['fractions'].values()))['fraction']:.0%} of the labels:"
            )
            lines.append("")
        lines += _md_table(header, rows)
        if metrics["task"] == "attributes":
            means = " | ".join(_fmt(summary[k]) for k in ("mean_accuracy", "mean_balanced_accuracy"))
            lines.append(f"| **mean** | {means} | | |")
    for question, m in metrics.get("multiclass", {}).items():
        lines += [
            "",
            f"**{question}**: accuracy {_fmt(m['accuracy'])}, mean per-class recall "
            f"{_fmt(m['mean_per_class_recall'])} (n={m['support']})",
        ]
    if "confusion_matrix" in metrics:
        lines += ["", "Confusion matrix (rows: true class, columns: predicted):", ""]
        lines += _md_table(
            ["", *metrics["labels"]],
            [[c, *row] for c, row in zip(metrics["labels"], metrics["confusion_matrix"], strict=True)],
        )
    if "retrieval" in metrics:
        recalls = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics["retrieval"].items())
        lines += ["", f"retrieval on the paired captions: {recalls}"]
    skipped = {split: counts for split, counts in (metrics.get("skipped") or {}).items() if counts}
    if skipped:
        text = "; ".join(
            f"{split}: " + ", ".join(f"{reason} {n}" for reason, n in counts.items())
            for split, counts in skipped.items()
        )
        lines += ["", f"images left out of these metrics: {text}"]
    if metrics.get("default_prompts_for"):
        lines += ["", f"built-in prompts used for: {', '.join(metrics['default_prompts_for'])}"]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _console_table(metrics: Mapping[str, Any]) -> Table:
    table = Table(
        title=f"{metrics['protocol']} · {metrics['benchmark']} · {metrics['split']} (n={metrics['n_test']})"
    )
    summary = metrics["summary"]
    if not metrics["per_label"]:
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in summary.items():
            table.add_row(k, _fmt(v))
        return table
    header, rows = _label_rows(metrics, metrics["per_label"])
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[_fmt(c) for c in row])
    if metrics["task"] == "attributes":
        means = [_fmt(summary["mean_accuracy"]), _fmt(summary["mean_balanced_accuracy"]), "", ""]
        table.add_row("[bold]mean[/bold]", *[f"[bold]{c}[/bold]" for c in means])
    else:
        table.add_row("[bold]accuracy[/bold]", f"[bold]{_fmt(summary['accuracy'])}[/bold]", "")
        table.add_row(
            "[bold]mean recall[/bold]", f"[bold]{_fmt(summary['mean_per_class_recall'])}[/bold]", ""
        )
    for question, m in metrics.get("multiclass", {}).items():
        table.add_row(
            question,
            _fmt(m["accuracy"]),
            f"{_fmt(m['mean_per_class_recall'])} (recall)",
            str(m["support"]),
            "",
        )
    return table


def write_report(
    metrics: Mapping[str, Any], output_dir: str | Path, console: Console | None = None, plots: bool = True
) -> Path:
    """metrics.json + report.md (+ PNG plots) in `output_dir`, and a table on the console."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    written = write_plots(metrics, output_dir) if plots else []
    (output_dir / "report.md").write_text(_markdown(metrics, written))
    (console or Console()).print(_console_table(metrics))
    return path
