"""The report of a dense probe: tables per class or point, and PNGs of a few test faces.

`parsing_examples.png`: per face its crop, the true mask and the predicted one (one colour per
class, a legend naming them); `landmark_examples.png`: each crop with the true points (green)
and the predicted ones (red). What they draw travels in the metrics under `_examples`, which
metrics.json leaves out (flip.evaluation.report).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLES = "_examples"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _palette(count: int) -> np.ndarray:
    """A colour per class (background black), distinct enough for ~20 classes."""
    from matplotlib import colormaps

    colours = (np.asarray([colormaps["tab20"](i % 20)[:3] for i in range(count)]) * 255).astype(np.uint8)
    colours[0] = 0
    return colours


def plot_dense_examples(metrics: Mapping[str, Any], path: Path) -> Path | None:
    """The examples figure of a parsing or landmark run (None when it holds no examples)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    examples = metrics.get(EXAMPLES)
    if not examples or not examples["images"]:
        return None
    images = examples["images"]
    if metrics["task"] == "parsing":  # a row per face: the face, its true mask, the predicted one
        colours = _palette(len(examples["classes"]))
        fig = Figure(figsize=(7.5, 2.0 * len(images)), dpi=110, layout="constrained")
        axes = np.asarray(fig.subplots(len(images), 3, squeeze=False))
        for row, image in enumerate(images):
            panels = (image, colours[examples["true"][row]], colours[examples["predicted"][row]])
            for col, (panel, title) in enumerate(zip(panels, ("face", "true", "predicted"), strict=True)):
                axes[row, col].imshow(panel)
                axes[row, col].set_title(title if row == 0 else "", fontsize=8)
                axes[row, col].set_axis_off()
        handles = [Patch(color=colours[i] / 255, label=n) for i, n in enumerate(examples["classes"])]
        fig.legend(handles=handles, loc="outside right upper", fontsize=7)
    else:  # three faces a row, the true points green and the predicted red
        columns = min(3, len(images))
        rows = math.ceil(len(images) / columns)
        fig = Figure(figsize=(2.2 * columns, 2.2 * rows + 0.3), dpi=110, layout="constrained")
        axes = np.asarray(fig.subplots(rows, columns, squeeze=False)).ravel()
        for ax, image, true, predicted in zip(
            axes, images, examples["true"], examples["predicted"], strict=False
        ):
            side = image.shape[0]
            ax.imshow(image, extent=(0, side, side, 0))
            for points, colour in ((true, "lime"), (predicted, "red")):
                xy = np.asarray(points) * side
                ax.scatter(xy[:, 0], xy[:, 1], s=7, c=colour)
        for ax in axes:
            ax.set_axis_off()
        fig.suptitle("true (green), predicted (red)", fontsize=8)
    fig.savefig(path)
    return path


def dense_plots(metrics: Mapping[str, Any], output_dir: Path) -> list[Path]:
    name = "parsing_examples.png" if metrics["task"] == "parsing" else "landmark_examples.png"
    path = plot_dense_examples(metrics, output_dir / name)
    return [] if path is None else [path]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def dense_markdown_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The report's body for a parsing or landmark run: summary, selection, per class or point."""
    summary, selected = metrics["summary"], metrics.get("selected")
    lines = _table(["metric", "value"], [[k, v] for k, v in summary.items()])
    # a probe chose its epoch; a fine-tune (flip.evaluation.finetuned) trained for its steps
    chosen = (
        f"epoch {selected['epoch']} of {len(selected['scores'])}, chosen on {selected['on']}; "
        if selected
        else ""
    )
    lines += ["", f"{chosen}blocks {metrics['blocks']}; head: {metrics['head']}", ""]
    if metrics["task"] == "parsing":
        lines += [
            f"Per class, one confusion matrix over all {metrics['n_pixels']} test pixels "
            f"({metrics['scored_at']}); mean F1 over the foreground classes:",
            "",
        ]
        rows = [[n, m["f1"], m["iou"], m["support"], m["predicted"]] for n, m in metrics["per_label"].items()]
        lines += _table(["class", "F1", "IoU", "pixels", "predicted"], rows)
    else:
        lines += [f"NME normalised by {metrics['normaliser']}; per point:", ""]
        lines += _table(["point", "NME"], [[n, m["nme"]] for n, m in metrics["per_label"].items()])
    return lines
