"""Zero-shot attribute benchmark over labelled shards (FaceShapes writes labels in `.json`).

Features are extracted once; each question (binary attribute or multi-class) is then scored
from the same features, and the report carries every attribute, not just the mean, so a
regression on one attribute cannot hide behind the average.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from flip.data.pipeline import SampleTransform, eval_pipeline, make_loader
from flip.evaluation.metrics import binary_metrics, multiclass_metrics
from flip.evaluation.zeroshot import ZeroShotClassifier
from flip.models import FlipModel


@torch.no_grad()
def extract_features(
    model: FlipModel, urls: Sequence[str], batch_size: int = 256, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Normalised image and caption features of every sample, with each sample's metadata."""
    device = next(model.parameters()).device
    pipeline = eval_pipeline(
        urls, SampleTransform(model.preprocess, model.tokenizer), batch_size, keep_metadata=True
    )
    images, texts, metadata = [], [], []
    for image, text, _keys, meta in track(
        make_loader(pipeline, min(num_workers, len(urls))), description="extracting features", transient=True
    ):
        images.append(model.encode_image(image.to(device), normalize=True).float().cpu())
        texts.append(model.encode_text(text.to(device), normalize=True).float().cpu())
        metadata.extend(meta)
    if not metadata:
        raise ValueError(f"no readable samples in {len(urls)} shard(s), e.g. {urls[0] if urls else None!r}")
    return torch.cat(images), torch.cat(texts), metadata


def _labels(metadata: list[dict], name: str, classes: Sequence[str] | None = None) -> np.ndarray:
    """Binary labels as bools, or class indices (-1 where unlabelled, e.g. a bald head's hair colour)."""
    values = [meta.get(name) for meta in metadata]
    if classes is None:
        if any(v is None for v in values):
            raise ValueError(f"attribute {name!r} is missing from some samples' .json metadata")
        return np.asarray(values, dtype=bool)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in values if v is not None and v not in index})
    if unknown:
        raise ValueError(
            f"attribute {name!r} has values {unknown} outside the prompted classes {list(classes)}"
        )
    return np.asarray([-1 if v is None else index[v] for v in values])


def score_attributes(
    classifier: ZeroShotClassifier, image_features: torch.Tensor, metadata: list[dict]
) -> dict[str, Any]:
    """Per-attribute and mean metrics of the classifier's decisions against the metadata labels."""
    probs = classifier.predict(image_features)
    per_label = {}
    for a, name in enumerate(classifier.binary_names):
        per_label[name] = binary_metrics(_labels(metadata, name), probs["binary"][:, a].numpy() > 0.5)
    multiclass = {}
    for name, (classes, _) in classifier.multiclass.items():
        y = _labels(metadata, name, classes)
        keep = y >= 0
        multiclass[name] = multiclass_metrics(y[keep], probs[name].argmax(dim=-1).numpy()[keep], classes)
    summary = {
        "mean_accuracy": float(np.mean([m["accuracy"] for m in per_label.values()]))
        if per_label
        else math.nan,
        "mean_balanced_accuracy": (
            float(np.mean([m["balanced_accuracy"] for m in per_label.values()])) if per_label else math.nan
        ),
    }
    for name, m in multiclass.items():
        summary[f"{name}_accuracy"] = m["accuracy"]
        summary[f"{name}_mean_per_class_recall"] = m["mean_per_class_recall"]
    return {"labels": list(per_label), "summary": summary, "per_label": per_label, "multiclass": multiclass}


def retrieval_recalls(
    image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5, 10)
) -> dict[str, float]:
    """Recall@k of the paired caption (image->text) and image (text->image)."""
    similarity = image_features @ text_features.T
    truth = torch.arange(len(similarity))
    out = {}
    for direction, sim in (("i2t", similarity), ("t2i", similarity.T)):
        rank = (sim > sim[truth, truth][:, None]).sum(dim=1)  # how many beat the true pair
        for k in ks:
            out[f"{direction}_R@{k}"] = float((rank < k).float().mean())
    return out


def evaluate_zeroshot_attributes(
    model: FlipModel,
    urls: Sequence[str],
    prompts: Mapping[str, Any],
    benchmark: str,
    split: str,
    checkpoint: str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, Any]:
    image_features, text_features, metadata = extract_features(model, urls, batch_size, num_workers)
    classifier = ZeroShotClassifier.from_prompts(
        model, prompts["templates"], prompts.get("binary"), prompts.get("multiclass")
    )
    scores = score_attributes(classifier, image_features, metadata)
    return {
        "benchmark": benchmark,
        "protocol": "zeroshot",
        "task": "attributes",
        "checkpoint": checkpoint,
        "split": split,
        "n_train": 0,
        "n_test": len(metadata),
        **scores,
        "retrieval": retrieval_recalls(image_features, text_features),
    }


def write_report(metrics: Mapping[str, Any], output_dir: str | Path, console: Console | None = None) -> Path:
    """metrics.json + report.md in `output_dir`, and the table on the console."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    table = Table(
        title=f"{metrics['protocol']} · {metrics['benchmark']} · {metrics['split']} (n={metrics['n_test']})"
    )
    for column in ("attribute", "accuracy", "balanced acc.", "support", "positives"):
        table.add_column(column, justify="left" if column == "attribute" else "right")
    lines = [
        f"# {metrics['protocol']} on {metrics['benchmark']} ({metrics['split']}, n={metrics['n_test']})",
        "",
        f"checkpoint: `{metrics.get('checkpoint')}`",
        "",
        "| attribute | accuracy | balanced accuracy | support | positives |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in metrics["per_label"].items():
        cells = [
            f"{m['accuracy']:.3f}",
            f"{m['balanced_accuracy']:.3f}",
            str(m["support"]),
            str(m["positives"]),
        ]
        table.add_row(name, *cells)
        lines.append(f"| {name} | {' | '.join(cells)} |")
    summary = metrics["summary"]
    mean_cells = [f"{summary['mean_accuracy']:.3f}", f"{summary['mean_balanced_accuracy']:.3f}", "", ""]
    table.add_row("[bold]mean[/bold]", *[f"[bold]{c}[/bold]" for c in mean_cells])
    lines.append(f"| **mean** | {' | '.join(mean_cells)} |")
    for name, m in metrics.get("multiclass", {}).items():
        lines += [
            "",
            f"**{name}**: accuracy {m['accuracy']:.3f}, "
            f"mean per-class recall {m['mean_per_class_recall']:.3f}",
        ]
        table.add_row(
            name, f"{m['accuracy']:.3f}", f"{m['mean_per_class_recall']:.3f} (recall)", str(m["support"]), ""
        )
    if "retrieval" in metrics:
        recalls = ", ".join(f"{k} {v:.3f}" for k, v in metrics["retrieval"].items())
        lines += ["", f"retrieval on the paired captions: {recalls}"]
    (output_dir / "report.md").write_text("\n".join(lines) + "\n")
    (console or Console()).print(table)
    return path
