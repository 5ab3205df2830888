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

from flip.evaluation.dense_report import dense_markdown_lines, dense_plots

DENSE = ("parsing", "landmarks")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def _label_rows(
    metrics: Mapping[str, Any], per_label: Mapping[str, Mapping], recalls: bool = True
) -> tuple[list[str], list[list]]:
    if metrics["task"] == "attributes":
        # with `recalls`, the two whose mean balanced accuracy is: faces with the attribute called
        # so, faces without it called so (absent from metrics written before they were). The
        # console table leaves them to report.md: seven columns do not fit 80 characters
        header = ["attribute", "accuracy", "balanced accuracy", "recall with", "recall without"]
        keys = ["accuracy", "balanced_accuracy", "recall_positive", "recall_negative"]
        if not recalls:
            header, keys = header[:3], keys[:2]
        header += ["support", "positives"]
        keys += ["support", "positives"]
        rows = [[n, *(m.get(k, "") for k in keys)] for n, m in per_label.items()]
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


def plot_roc(far: Sequence[float], tar: Sequence[float], path: Path, title: str, floor: float) -> Path:
    """ROC of a verification run: TAR against FAR, the FAR axis logarithmic as face papers draw it;
    FAR 0 is drawn at `floor` (the left edge: half of one false accept), chance dashed."""
    far, tar = np.maximum(np.asarray(far, dtype=float), floor), np.asarray(tar, dtype=float)
    fig = _figure(5.5, 4.5)
    ax = fig.subplots()
    ax.plot(far, tar, marker=".", markersize=3)
    ax.plot([floor, 1], [floor, 1], color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate (different people called the same)")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", linewidth=0.3)
    fig.savefig(path)
    return path


def plot_scatter(
    true: Sequence[float], predicted: Sequence[float], path: Path, name: str, title: str
) -> Path:
    """Predicted against true values, with the diagonal and the band within 5 (CS@5's)."""
    fig = _figure(5.0, 5.0)
    ax = fig.subplots()
    low = min(min(true, default=0), min(predicted, default=0))
    high = max(max(true, default=1), max(predicted, default=1))
    band = {"color": "gray", "alpha": 0.2, "lw": 0, "label": "within 5 (CS@5)"}
    ax.fill_between([low, high], [low - 5, high - 5], [low + 5, high + 5], **band)
    ax.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1)
    ax.scatter(true, predicted, s=6, alpha=0.5)
    ax.set_xlabel(f"true {name}")
    ax.set_ylabel(f"predicted {name}")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.savefig(path)
    return path


def plot_subgroups(subgroups: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> Path:
    """Per subgroup question, bars per group: each accuracy and CS@5 (left), each MAE (right)."""
    rows = list(subgroups.items())
    first = next(iter(rows[0][1]["groups"].values()))
    scores = [k for k in first if k.endswith(("_accuracy", "_cs5"))]
    errors = [k for k in first if k.endswith("_mae")]
    columns = 1 + bool(errors)
    height = sum(1.0 + 0.2 * len(block["groups"]) * max(1, len(scores) * 0.5) for _, block in rows)
    fig = _figure(6.0 * columns, height)
    axes = np.atleast_2d(np.asarray(fig.subplots(len(rows), columns, squeeze=False)))
    for row, (question, block) in enumerate(rows):
        groups = [f"{g} ({m['support']})" for g, m in block["groups"].items()]
        for col, (names, limit) in enumerate([(scores, (0, 1)), (errors, None)][:columns]):
            ax, y = axes[row, col], np.arange(len(groups))
            height_each = 0.8 / max(1, len(names))
            for i, name in enumerate(names):
                values = [m[name] for m in block["groups"].values()]
                ax.barh(y + i * height_each, values, height_each, label=name.replace("_", " "))
            ax.set_yticks(y + height_each * (len(names) - 1) / 2, groups)
            ax.invert_yaxis()
            if limit:
                ax.set_xlim(*limit)
            ax.set_title(f"per {question} · {title}" if col == 0 else f"per {question}: mean absolute error")
            if row == 0:  # the same series in every row
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.savefig(path)
    return path


def write_plots(metrics: Mapping[str, Any], output_dir: Path) -> list[Path]:
    """per_label.png (bars), confusion_matrix.png, confusion_<question>.png and roc.png where they apply."""
    title = f"{metrics['protocol']} · {metrics['benchmark']} · {metrics['split']}"
    task, paths = metrics["task"], []
    if task in DENSE:
        return dense_plots(metrics, output_dir)
    key, chance = ("balanced_accuracy", 0.5) if task == "attributes" else ("recall", None)
    if task == "verification":
        floor = 0.5 / max(metrics["n_pairs"] - metrics["n_same"], 1)
        roc = metrics["roc"]
        paths.append(plot_roc(roc["far"], roc["tar"], output_dir / "roc.png", title, floor))
    elif task == "retrieval":
        summary = metrics["summary"]
        series = {"recall": {k: v for k, v in summary.items()}}
        paths.append(plot_label_bars(series, output_dir / "recalls.png", "recall", title, None))
    elif metrics.get("fractions") and metrics["per_label"]:
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
    for name, block in metrics.get("regression", {}).items():
        if block.get("true"):
            path = output_dir / f"{name}_scatter.png"
            paths.append(plot_scatter(block["true"], block["predicted"], path, name, title))
    if metrics.get("subgroups"):
        paths.append(plot_subgroups(metrics["subgroups"], output_dir / "subgroups.png", title))
    return paths


# -- report ------------------------------------------------------------------------------------


def _selected(published: Mapping[str, Any]) -> str:
    """What was chosen on the test split: `l2 0.01`, `epoch 37`, per label on multitask splits
    (`gender l2 0.001, age alpha 10`)."""

    def choices(selected: Mapping[str, Any]) -> list[str]:
        out = []
        for k, v in selected.items():
            if isinstance(v, Mapping):
                out += [f"{k} {choice}" for choice in choices(v)]
            else:
                out.append(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}")
        return out

    return ", ".join(choices(published["selected"]))


def _as_published_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The figure selected on the test split (a paper's protocol, on request) beside the honest one."""
    published = metrics["as_published"]
    label, honest = published["label"], metrics["summary"]
    names = [n for n in honest if n in published["summary"]]
    chosen = metrics.get("selected") or {}  # the token probe's honest epoch, and where it was chosen
    honest_header = "honest" + (
        f" (epoch {chosen['epoch']}, chosen on {chosen['on']})" if "epoch" in chosen else ""
    )
    lines = [f"**{label}** ({_selected(published)}), beside the honest figure:", ""]
    lines += _md_table(
        ["metric", honest_header, label],
        [[n.replace("_", " "), honest[n], published["summary"][n]] for n in names],
    )
    return [*lines, ""]


def _markdown(metrics: Mapping[str, Any], plots: Sequence[Path]) -> str:
    counts = f"n={metrics['n_test']}" + (f", n_train={metrics['n_train']}" if metrics.get("n_train") else "")
    lines = [
        f"# {metrics['protocol']} on {metrics['benchmark']} ({metrics['split']}, {counts})",
        "",
        f"checkpoint: `{metrics.get('checkpoint')}`",
        "",
    ]
    if metrics.get("adaptation"):  # a fine-tuned model: how its tower was adapted, which weights
        lines += [
            f"adaptation: {metrics['adaptation']['label']} ({metrics.get('weights', 'raw')} weights)",
            "",
        ]
    summary = metrics["summary"]
    if metrics["task"] in DENSE:
        lines += dense_markdown_lines(metrics)
    elif metrics["task"] == "multitask":
        lines += _multitask_lines(metrics)
    elif metrics.get("fractions"):
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
    elif not metrics.get("as_published"):  # with it, the honest figures stand in its table below
        lines += _md_table(["metric", "value"], [[k.replace("_", " "), v] for k, v in summary.items()])
        lines.append("")
    if metrics.get("as_published"):
        lines += _as_published_lines(metrics)
    if metrics["per_label"] and metrics["task"] not in DENSE:
        header, rows = _label_rows(metrics, metrics["per_label"])
        if metrics.get("fractions"):
            lines.append(
                f"Per label, {next(reversed(metrics['fractions'].values()))['fraction']:.0%} of the labels:"
            )
            lines.append("")
        lines += _md_table(header, rows)
        if metrics["task"] == "attributes":
            means = " | ".join(_fmt(summary[k]) for k in ("mean_accuracy", "mean_balanced_accuracy"))
            lines.append(f"| **mean** | {means} |" + " |" * (len(header) - 3))
    for question, m in metrics.get("multiclass", {}).items():
        lines += [
            "",
            f"**{question}**: accuracy {_fmt(m['accuracy'])}, mean per-class recall "
            f"{_fmt(m['mean_per_class_recall'])} (n={m['support']})",
        ]
    if "confusion_matrix" in metrics and metrics["task"] not in DENSE:
        lines += ["", "Confusion matrix (rows: true class, columns: predicted):", ""]
        lines += _md_table(
            ["", *metrics["labels"]],
            [[c, *row] for c, row in zip(metrics["labels"], metrics["confusion_matrix"], strict=True)],
        )
    if metrics.get("folds"):  # verification: each fold's threshold, chosen on the other folds
        lines += [f"Per fold, the threshold is {metrics['threshold_rule']}:", ""]
        rows = [[f["fold"], f["threshold"], f["accuracy"], f["n_pairs"]] for f in metrics["folds"]]
        lines += _md_table(["fold", "threshold", "accuracy", "pairs"], rows)
        lines.append("")
        if metrics.get("notes"):
            lines += [f"- {note}" for note in metrics["notes"]] + [""]
        skipped_pairs = ", ".join(f"{k} {v}" for k, v in metrics.get("pairs_skipped", {}).items())
        lines.append(
            f"{metrics['n_pairs']} of {metrics['pairs_listed']} listed pairs scored"
            + (f" (left out: {skipped_pairs})" if skipped_pairs else "")
            + f"; flip test {'on' if metrics.get('flip_test') else 'off'}"
        )
    for name, block in metrics.get("regression", {}).items():
        lines += ["", _regression_line(name, block)]
    for question, block in (metrics.get("subgroups") or {}).items():
        lines += ["", *_subgroup_lines(question, block)]
    if "retrieval" in metrics:
        recalls = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics["retrieval"].items())
        lines += ["", f"retrieval on the paired captions: {recalls}"]
    if metrics.get("binding"):
        lines += ["", *_binding_lines(metrics["binding"])]
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


def _binding_lines(binding: Mapping[str, Any]) -> list[str]:
    """The binding metric: how often an image's caption beats it with one attribute changed."""
    if not binding["n_foils"]:
        return ["binding: no caption of this split could be foiled (no attribute phrase found)"]
    lines = [
        f"binding (each caption against itself with one attribute changed): {_fmt(binding['accuracy'])} "
        f"of {binding['n_foils']} foils on {binding['n_images']} images, mean per attribute "
        f"{_fmt(binding['mean_per_attribute'])}",
        "",
    ]
    rows = [[name, m["accuracy"], m["n"]] for name, m in binding["per_attribute"].items()]
    return lines + _md_table(["changed attribute", "foil accuracy", "foils"], rows)


def _multitask_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The summary of a multitask split (UTKFace, FairFace): per training fraction for probes,
    with what chose each probe's l2 / alpha."""
    summary, lines = metrics["summary"], []
    if not metrics.get("fractions"):
        return [*_md_table(["metric", "value"], [[k.replace("_", " "), v] for k, v in summary.items()]), ""]
    names = list(summary)
    rows = [
        [f"{block['fraction']:.0%} ({block['n_train']})", *[block["summary"][n] for n in names]]
        for block in metrics["fractions"].values()
    ]
    lines += _md_table(["train labels", *[n.replace("_", " ") for n in names]], rows)
    chosen = next(reversed(metrics["fractions"].values()))["selection"]
    text = ", ".join(
        f"{name} {'l2' if 'l2' in c else 'alpha'} {c.get('l2', c.get('alpha')):g}"
        for name, c in chosen.items()
    )
    where = {c.get("l2_selected_on", c.get("alpha_selected_on")) for c in chosen.values()}
    return [*lines, "", f"chosen on {', '.join(sorted(where))}: {text}", ""]


def _regression_line(name: str, block: Mapping[str, Any]) -> str:
    parts = []
    if "mae" in block:
        parts.append(f"MAE {_fmt(block['mae'])}, CS@5 {_fmt(block['cs5'])} (n={block['n']})")
    if "bucket_accuracy" in block:
        parts.append(
            f"accuracy of the predicted {name}'s bucket {_fmt(block['bucket_accuracy'])} "
            f"(n={block['bucket_support']})"
        )
    return f"**{name}**: " + "; ".join(parts)


def _subgroup_lines(question: str, block: Mapping[str, Any]) -> list[str]:
    """Per group of one subgroup question: support and every metric, then the best-worst gap."""
    groups = block["groups"]
    names = [k for k in next(iter(groups.values())) if k != "support"]
    rows = [[group, m["support"], *[m[n] for n in names]] for group, m in groups.items()]
    gaps = block["gap"]
    rows.append(["**gap**", "", *[gaps[n]["gap"] if n in gaps else "" for n in names]])
    lines = [f"Per {question} (gap: best minus worst group with samples):", ""]
    lines += _md_table([question, "support", *[n.replace("_", " ") for n in names]], rows)
    if block.get("unlabelled"):
        lines += ["", f"{block['unlabelled']} sample(s) without a {question} label are in no group."]
    return lines


def _console_table(metrics: Mapping[str, Any]) -> Table:
    table = Table(
        title=f"{metrics['protocol']} · {metrics['benchmark']} · {metrics['split']} (n={metrics['n_test']})"
    )
    if metrics.get("as_published"):  # the rows below are honest; the test-selected figure under them
        published = metrics["as_published"]
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in published["summary"].items())
        table.caption = f"{published['label']} ({_selected(published)}): {figures}"
    summary = metrics["summary"]
    if not metrics["per_label"] or metrics["task"] in DENSE:
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in summary.items():
            table.add_row(k, _fmt(v))
        return table
    header, rows = _label_rows(metrics, metrics["per_label"], recalls=False)
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[_fmt(c) for c in row])
    if metrics["task"] == "attributes":
        means = [_fmt(summary["mean_accuracy"]), _fmt(summary["mean_balanced_accuracy"])]
        means += [""] * (len(header) - 3)
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
    """metrics.json + report.md (+ PNG plots) in `output_dir`, and a table on the console. Keys
    starting with `_` (a dense probe's `_examples`: images for its figure) stay out of metrics.json."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.json"
    kept = {k: v for k, v in metrics.items() if not k.startswith("_")}
    path.write_text(json.dumps(kept, indent=2) + "\n")
    written = write_plots(metrics, output_dir) if plots else []
    (output_dir / "report.md").write_text(_markdown(metrics, written))
    (console or Console()).print(_console_table(metrics))
    return path
