"""One table for many models: the headline metric of each (benchmark, protocol) cell of a suite.

A cell's metrics.json holds dozens of figures; a leaderboard shows the few a paper's table
would, chosen by the cell's task (`headline_metrics`), so columns of different models line up.
leaderboard.csv is the machine-readable table (`compare_leaderboards` reads two of them);
leaderboard.md marks each column's best value and lists the cells that failed, with their errors;
leaderboard.png colours each column from worst to best.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flip.atomic import atomic_file, atomic_write_text
from flip.evaluation.multitask import higher_is_better

ERROR = "error"  # what leaderboard.csv holds where a cell failed
RETRIEVAL_HEADLINE = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5)]


@dataclass(frozen=True)
class CellResult:
    """One (model, benchmark, protocol) cell: its metrics.json, or the error that stopped it."""

    model: str
    benchmark: str
    protocol: str
    metrics: dict[str, Any] | None = None
    error: str | None = None

    @property
    def column(self) -> str:
        return f"{self.benchmark}/{self.protocol}"


def headline_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The figures a leaderboard shows for a cell, by task: attributes' mean (balanced) accuracy,
    a classification's accuracy, each multitask question's accuracy and each value's MAE (a
    regression's too), verification's mean fold accuracy, retrieval's R@1 and R@5 in both
    directions, parsing's mean F1 and mIoU, landmarks' NME, failure rates and AUCs."""
    summary, task = metrics.get("summary") or {}, metrics.get("task")
    if task == "attributes":
        names = ["mean_accuracy", "mean_balanced_accuracy"]
    elif task == "classification":
        names = ["accuracy"]
    elif task == "multitask":
        names = [k for k in summary if k.endswith(("_accuracy", "_mae"))]
    elif task == "regression":  # a fine-tuned regression head (flip.evaluation.tasks.Regression)
        names = [k for k in summary if k.endswith("_mae")]
    elif task == "verification":
        names = ["accuracy_mean"]
    elif task == "retrieval":
        names = RETRIEVAL_HEADLINE
    elif task == "parsing":
        names = ["mean_f1", "miou"]
    elif task == "landmarks":
        names = [k for k in summary if k == "nme" or k.startswith(("fr_", "auc_"))]
    else:
        names = []
    return {name: float(summary[name]) for name in names if summary.get(name) is not None}


@dataclass
class Leaderboard:
    """Rows are models (in suite order), columns `benchmark/protocol/metric` (in suite order);
    a failed cell has ERROR in its columns and its message in `errors`. `sources`: the rows whose
    figures were read from elsewhere than cells/ (a fine-tune run's metrics.json), and that file."""

    models: list[str]
    columns: list[str]
    values: dict[str, dict[str, float | str]]
    errors: list[CellResult]
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_cells(
        cls, cells: Sequence[CellResult], models: Sequence[str], sources: Mapping[str, str] | None = None
    ) -> Leaderboard:
        columns: dict[str, None] = {}
        per_cell: dict[str, list[str]] = {}  # cell column -> its metric columns (seen on any model)
        for cell in cells:
            per_cell.setdefault(cell.column, [])
            for name in headline_metrics(cell.metrics) if cell.metrics else {}:
                if f"{cell.column}/{name}" not in per_cell[cell.column]:
                    per_cell[cell.column].append(f"{cell.column}/{name}")
        for cell_column, metric_columns in per_cell.items():
            for column in metric_columns or [cell_column]:  # a cell that failed everywhere: one column
                columns[column] = None
        values: dict[str, dict[str, float | str]] = {m: {} for m in models}
        for cell in cells:
            if cell.metrics is not None:
                for name, value in headline_metrics(cell.metrics).items():
                    values[cell.model][f"{cell.column}/{name}"] = value
            elif cell.error is not None:
                for column in per_cell[cell.column] or [cell.column]:
                    values[cell.model][column] = ERROR
        errors = [cell for cell in cells if cell.error is not None]
        return cls(list(models), list(columns), values, errors, dict(sources or {}))

    def best(self, column: str) -> float | None:
        found = [v for v in (self.values[m].get(column) for m in self.models) if _number(v)]
        if not found:
            return None
        return (max if higher_is_better(column) else min)(found)

    def csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["model", *self.columns])
        for model in self.models:
            writer.writerow([model, *(_csv_value(self.values[model].get(c)) for c in self.columns)])
        return out.getvalue()

    def markdown(self) -> str:
        lines = [
            "# Leaderboard",
            "",
            "One headline metric per cell (benchmark / protocol / metric); **bold** is the best of "
            "each column (the lowest for an MAE, the highest otherwise). Every figure of a cell is in "
            "`cells/<model>/<benchmark>/<protocol>/metrics.json`.",
            "",
            "| model | " + " | ".join(c.replace("/", " / ") for c in self.columns) + " |",
            "|---|" + "---:|" * len(self.columns),
        ]
        best = {c: self.best(c) for c in self.columns}
        for model in self.models:
            row = []
            for column in self.columns:
                value = self.values[model].get(column)
                text = _md_value(value)
                row.append(f"**{text}**" if _number(value) and value == best[column] else text)
            lines.append(f"| {model} | " + " | ".join(row) + " |")
        if self.sources:
            lines += [
                "",
                "## Fine-tuned rows",
                "",
                "Each figure of these rows is in the fine-tune run's own metrics.json, read, not recomputed:",
                "",
            ]
            lines += [f"- {row}: `{path}`" for row, path in self.sources.items()]
        if self.errors:
            lines += ["", "## Failed cells", ""]
            lines += [f"- {e.model} / {e.column}: {e.error}" for e in self.errors]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """leaderboard.csv, leaderboard.md and leaderboard.png in `folder`, each written whole."""
        folder = Path(folder)
        atomic_write_text(folder / "leaderboard.csv", self.csv_text())
        atomic_write_text(folder / "leaderboard.md", self.markdown())
        paths = [folder / "leaderboard.csv", folder / "leaderboard.md"]
        if self.columns and self.models:
            paths.append(self.heatmap(folder / "leaderboard.png"))
        return paths

    def heatmap(self, path: Path) -> Path:
        """Each column scaled from its worst (0) to its best (1) value, the figures written in."""
        from matplotlib import colormaps
        from matplotlib.figure import Figure  # Agg canvas, no pyplot state: safe in any process

        grid = [[self._scaled(m, c) for c in self.columns] for m in self.models]
        fig = Figure(
            figsize=(2 + 0.9 * len(self.columns), 3 + 0.45 * len(self.models)),
            dpi=110,
            layout="constrained",
        )
        ax = fig.subplots()
        cmap = colormaps["viridis"].with_extremes(bad="lightgray")  # a failed cell
        image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for i, model in enumerate(self.models):
            for j, column in enumerate(self.columns):
                light = _number(grid[i][j]) and grid[i][j] > 0.6  # viridis' yellow end: dark text
                text = _md_value(self.values[model].get(column))
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if light else "white")
        ax.set_xticks(range(len(self.columns)), self.columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(self.models)), self.models, fontsize=8)
        fig.colorbar(image, ax=ax, label="worst -> best in each column")
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png")
        return path

    def _scaled(self, model: str, column: str) -> float:
        value = self.values[model].get(column)
        found = [v for v in (self.values[m].get(column) for m in self.models) if _number(v)]
        if not _number(value):
            return math.nan
        low, high = min(found), max(found)
        if high == low:
            return 1.0
        scaled = (value - low) / (high - low)
        return scaled if higher_is_better(column) else 1.0 - scaled


def read_leaderboard_csv(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """model -> column -> the text leaderboard.csv holds."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "model" not in rows[0]:
        raise ValueError(f"{path}: not a leaderboard.csv (its first column is not `model`)")
    return {row.pop("model"): row for row in rows}


@dataclass(frozen=True)
class Difference:
    model: str
    column: str
    a: str | None  # None: the cell is not in that leaderboard
    b: str | None

    @property
    def delta(self) -> float | None:
        try:
            return float(self.b) - float(self.a)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None


def compare_leaderboards(
    a: Mapping[str, Mapping[str, str]], b: Mapping[str, Mapping[str, str]]
) -> list[Difference]:
    """The (model, column) cells whose text differs between two leaderboards, or that only one has."""
    models = list(dict.fromkeys([*a, *b]))
    out = []
    for model in models:
        row_a, row_b = a.get(model, {}), b.get(model, {})
        for column in dict.fromkeys([*row_a, *row_b]):
            va, vb = row_a.get(column) or None, row_b.get(column) or None
            if va != vb:
                out.append(Difference(model, column, va, vb))
    return out


def comparison_markdown(differences: Sequence[Difference], a: str, b: str) -> str:
    if not differences:
        return f"{a} and {b} hold the same values in every cell.\n"
    lines = [
        f"{len(differences)} cell(s) differ: A = {a}, B = {b}",
        "",
        "| model | column | A | B | B - A |",
        "|---|---|---:|---:|---:|",
    ]
    for d in differences:
        delta = "" if d.delta is None else f"{d.delta:+.4f}"
        lines.append(f"| {d.model} | {d.column} | {d.a or '-'} | {d.b or '-'} | {delta} |")
    return "\n".join(lines) + "\n"


def read_cell(folder: Path, model: str, benchmark: str, protocol: str) -> CellResult | None:
    """A cell as a suite left it: done (metrics.json), failed (error.json) or not run (None)."""
    if (folder / "metrics.json").is_file():
        return CellResult(
            model, benchmark, protocol, metrics=json.loads((folder / "metrics.json").read_text())
        )
    if (folder / "error.json").is_file():
        error = json.loads((folder / "error.json").read_text())["error"]
        return CellResult(model, benchmark, protocol, error=error)
    return None


def _number(value: Any) -> bool:
    return isinstance(value, float) and not math.isnan(value)


def _csv_value(value: float | str | None) -> str:
    return "" if value is None else value if isinstance(value, str) else repr(value)


def _md_value(value: float | str | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else f"{value:.4f}"
