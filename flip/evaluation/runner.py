"""What eval/zeroshot.py, eval/linear_probe.py and eval/retrieval.py do with a composed config.

Kept apart from the Hydra decorators so tests (and other programs) can call them with a
config they composed themselves. The model is a FLIP checkpoint (`ckpt=`, a .ckpt or an
exported folder) or, for baselines through the same code, any open_clip architecture with a
pretrained tag or local weights (`baseline.name=ViT-B-16 baseline.pretrained=openai`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flip.benchmarks.base import LabelledSplit
from flip.config import plain
from flip.evaluation.features import FeatureCache, SplitFeatures, model_identity, split_features
from flip.evaluation.linear_probe import linear_probe
from flip.evaluation.report import write_report
from flip.evaluation.retrieval import evaluate_retrieval
from flip.evaluation.zeroshot import evaluate_zeroshot
from flip.models import FlipModel

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_eval_model(cfg: DictConfig) -> tuple[FlipModel, str, str]:
    """(model in eval mode, cache identity, the name metrics.json records as `checkpoint`)."""
    device = resolve_device(cfg.get("device"))
    baseline = cfg.get("baseline") or {}
    if cfg.get("ckpt") and baseline.get("name"):
        raise ValueError(f"give either ckpt={cfg.ckpt!r} or baseline.name={baseline['name']!r}, not both")
    if cfg.get("ckpt"):
        from flip.checkpoint import load

        return load(cfg.ckpt, device=device), model_identity(ckpt=cfg.ckpt), str(cfg.ckpt)
    if baseline.get("name"):
        from flip.models import build_model

        name, pretrained = baseline["name"], baseline.get("pretrained")
        model = (
            build_model(name, pretrained=pretrained, cache_dir=baseline.get("cache_dir")).to(device).eval()
        )
        return model, model_identity(name=name, pretrained=pretrained), f"open_clip:{name}:{pretrained}"
    raise ValueError(
        "no model to evaluate: give ckpt=PATH (a FLIP .ckpt or exported folder) or "
        "baseline.name=ARCH baseline.pretrained=TAG_OR_PATH (an open_clip model)"
    )


def load_split(
    benchmark: Mapping[str, Any],
    split: str,
    max_samples: int | None = None,
    seed: int = 0,
    root: str | None = None,
) -> LabelledSplit:
    """A split read by the benchmark's configured reader (`benchmark.reader`), optionally subsampled."""
    if root is None and isinstance(benchmark, DictConfig) and OmegaConf.is_missing(benchmark, "root"):
        raise ValueError(
            f"benchmark.root is not set: give benchmark.root=DIR, the folder holding {benchmark.get('name')} "
            "in its published layout (see conf/benchmark/<name>.yaml and the README)"
        )
    reader = benchmark["reader"]
    if not callable(reader):  # a config node; already a partial when Hydra instantiated a parent
        overrides = {"root": root} if root is not None else {}
        reader = instantiate(reader, **overrides)
    labelled = reader(split=split)
    if len(labelled) == 0:
        raise ValueError(f"{benchmark.get('name')}: split {split!r} holds no samples")
    if labelled.skipped:
        reasons = ", ".join(f"{k} {v}" for k, v in labelled.skipped_by_reason.items())
        log.warning(
            "%s/%s: the reader left out %d record(s): %s",
            labelled.benchmark,
            split,
            labelled.skipped,
            reasons,
        )
    labelled = labelled.sample(max_samples, seed)
    counts = ", ".join(f"{k} {v}" for k, v in labelled.counts().items())
    log.info("%s/%s: %d samples (%s)", labelled.benchmark, split, len(labelled), counts)
    return labelled


class _Features:
    """Features of the configured benchmark's splits for one model, through the on-disk cache."""

    def __init__(self, cfg: DictConfig, model: FlipModel, model_id: str) -> None:
        self.cfg, self.model, self.model_id = cfg, model, model_id
        self.cache = FeatureCache(cfg.feature_cache_dir) if cfg.get("feature_cache_dir") else None

    def __call__(self, split: str, max_samples: int | None = None) -> SplitFeatures:
        labelled = load_split(self.cfg.benchmark, split, max_samples, self.cfg.get("seed", 0))
        return split_features(
            self.model, labelled, self.model_id, self.cache, self.cfg.batch_size, self.cfg.num_workers
        )


UNREADABLE = "unreadable_image"  # skip reason: the image file is missing or does not decode


def skipped_images(*splits: SplitFeatures | None) -> dict[str, dict[str, int]]:
    """Per split, the images left out of the metrics by reason: those its reader dropped (bad
    paths, labels outside the protocol) and those that could not be read at extraction, so a
    score over fewer images than the benchmark holds says so in metrics.json."""
    out: dict[str, dict[str, int]] = {}
    for features in splits:
        if features is None:
            continue
        counts = dict(features.split.skipped_by_reason)
        if features.skipped:
            counts[UNREADABLE] = counts.get(UNREADABLE, 0) + features.skipped
        out[features.split.split] = dict(sorted(counts.items()))
    return out


def benchmark_prompts(benchmark: Mapping[str, Any]) -> dict[str, Any]:
    """The zero-shot prompts of a benchmark config: templates, binary, multiclass, classes."""
    node = plain(benchmark)
    return {k: node.get(k) for k in ("templates", "binary", "multiclass", "classes")}


def run_zeroshot(cfg: DictConfig) -> dict[str, Any]:
    """Zero-shot metrics of `cfg.split` of `cfg.benchmark`, written to `cfg.output_dir`."""
    model, model_id, name = load_eval_model(cfg)
    features = _Features(cfg, model, model_id)(cfg.split, cfg.get("max_samples"))
    metrics = evaluate_zeroshot(model, features, benchmark_prompts(cfg.benchmark), name)
    metrics["skipped"] = skipped_images(features)
    write_report(metrics, cfg.output_dir)
    log.info("zero-shot results in %s", Path(cfg.output_dir) / "metrics.json")
    return metrics


def probe_metrics(
    train: SplitFeatures,
    test: SplitFeatures,
    val: SplitFeatures | None,
    probe_cfg: Mapping[str, Any],
    checkpoint: str | None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Linear-probe metrics (every fraction, plus the largest fraction at the top level)."""
    if train.split.task != test.split.task or train.split.label_names != test.split.label_names:
        raise ValueError(
            f"train and test splits disagree on their labels: {train.split.label_names} vs "
            f"{test.split.label_names}"
        )
    fractions = linear_probe(
        (train.features, train.split.targets),
        (test.features, test.split.targets),
        test.split.label_names,
        test.split.task,
        val=None if val is None else (val.features, val.split.targets),
        fractions=sorted(float(f) for f in probe_cfg["fractions"]),
        grid=[float(v) for v in probe_cfg["l2_grid"]],
        seed=probe_cfg.get("seed", 0),
        holdout=probe_cfg.get("holdout", 0.2),
        max_iter=probe_cfg.get("max_iter", 300),
        device=device,
    )
    top = fractions[max(fractions, key=float)]
    metrics = {
        "benchmark": test.split.benchmark,
        "protocol": "linear_probe",
        "task": test.split.task,
        "checkpoint": checkpoint,
        "split": test.split.split,
        "n_train": top["n_train"],
        "n_test": len(test.split),
        "labels": list(test.split.label_names),
        "summary": top["summary"],
        "per_label": top["per_label"],
        "l2": top["l2"],
        "train_split": train.split.split,
        "val_split": None if val is None else val.split.split,
        "fractions": fractions,
    }
    if "confusion_matrix" in top:
        metrics["confusion_matrix"] = top["confusion_matrix"]
    return metrics


def run_linear_probe(cfg: DictConfig) -> dict[str, Any]:
    """Linear probes trained on `cfg.train_split`, l2 chosen on `cfg.val_split`, tested on `cfg.split`."""
    model, model_id, name = load_eval_model(cfg)
    features = _Features(cfg, model, model_id)
    train = features(cfg.train_split, cfg.get("max_train"))
    val = features(cfg.val_split, cfg.get("max_val")) if cfg.get("val_split") else None
    test = features(cfg.split, cfg.get("max_samples"))
    metrics = probe_metrics(train, test, val, cfg.probe, name, resolve_device(cfg.get("device")))
    metrics["skipped"] = skipped_images(train, val, test)
    write_report(metrics, cfg.output_dir)
    log.info("linear-probe results in %s", Path(cfg.output_dir) / "metrics.json")
    return metrics


def run_retrieval(cfg: DictConfig) -> dict[str, Any]:
    """Image<->text Recall@1/5/10 on a captioned split."""
    model, model_id, name = load_eval_model(cfg)
    features = _Features(cfg, model, model_id)(cfg.split, cfg.get("max_samples"))
    metrics = evaluate_retrieval(model, features, name, cfg.batch_size)
    metrics["skipped"] = skipped_images(features)
    write_report(metrics, cfg.output_dir)
    log.info("retrieval results in %s", Path(cfg.output_dir) / "metrics.json")
    return metrics
