"""The one evaluation path: a model, a benchmark and the protocols to run on it.

eval/*.py, the end of train.py and the in-training ZeroShotBenchmark callback all come here.
A protocol (zero-shot, linear probe, retrieval: conf/protocol/<name>.yaml) asks a shared
`BenchmarkFeatures` for the splits it needs, so a split's features are extracted once however
many protocols use them, and returns its metrics.json; this module adds which images were left
out (`skipped`) and writes the reports.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from hydra.utils import instantiate

from flip.evaluation.benchmark import Benchmark
from flip.evaluation.features import BenchmarkFeatures, FeatureCache, SplitFeatures
from flip.evaluation.report import write_report
from flip.models import FlipModel

log = logging.getLogger(__name__)

UNREADABLE = "unreadable_image"  # skip reason: the image file is missing or does not decode


class EvaluationProtocol(Protocol):
    """What a protocol module provides: metrics (the metrics.json schema) of the model on the
    splits it asks `features` for; the evaluated split is `features()`."""

    def __call__(
        self, model: FlipModel, features: BenchmarkFeatures, checkpoint: str | None = None
    ) -> dict[str, Any]: ...


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


def evaluate(
    model: FlipModel,
    benchmark: Benchmark | Mapping[str, Any],
    protocols: Mapping[str, EvaluationProtocol],
    output_dir: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    checkpoint: str | None = None,
    model_id: str | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Each protocol's metrics, by name, on `split` of `benchmark` (default: its test split).

    `benchmark` is a Benchmark or a conf/benchmark/<name>.yaml node. With `output_dir`, the
    first protocol's metrics.json, report.md and plots land in it and every other protocol's in
    `output_dir/<name>/` (train.py: `<run>/eval/` and `<run>/eval/linear_probe/`). `max_samples`
    and `seed` take a seeded subsample of the evaluated split; `checkpoint` is what
    metrics.json records as the model; features come from `cache` when `model_id` names the
    model. The model is evaluated in eval mode and left in the mode it was in.
    """
    if not protocols:
        raise ValueError("no protocols to run: give at least one, e.g. zeroshot (conf/protocol/<name>.yaml)")
    if not isinstance(benchmark, Benchmark):
        benchmark = Benchmark.from_config(benchmark)
    features = BenchmarkFeatures(
        model, benchmark, split, max_samples, seed, model_id, cache, batch_size, num_workers, progress
    )
    results: dict[str, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    try:
        for index, (name, protocol) in enumerate(protocols.items()):
            features.requested.clear()
            metrics = protocol(model, features, checkpoint)
            metrics["skipped"] = skipped_images(*features.requested)
            info = {f.split.split: f.split.info for f in features.requested if f.split.info}
            if info:  # how a reader built its splits (e.g. a seeded split of UTKFace), for reproducing them
                metrics["split_info"] = info
            if output_dir is not None:
                where = Path(output_dir) if index == 0 else Path(output_dir) / name
                write_report(metrics, where)
                log.info("%s results in %s", name, where / "metrics.json")
            results[name] = metrics
    finally:
        model.train(was_training)
    return results


def evaluate_config(
    model: FlipModel,
    cfg: Mapping[str, Any],
    output_dir: str | os.PathLike | None = None,
    *,
    checkpoint: str | None = None,
    model_id: str | None = None,
    cache: FeatureCache | None = None,
) -> dict[str, dict[str, Any]]:
    """`evaluate` with the settings of an evaluation node, as conf/eval/default.yaml defines it
    (train.py's `eval`, the top level of eval/*.py): `benchmark`, `protocols` (name ->
    conf/protocol/<name>.yaml node), `split`, `max_samples`, `seed`, `batch_size`,
    `num_workers` and `test_shards` (labelled shards read as the evaluated split instead)."""
    split = cfg.get("split") or cfg["benchmark"].get("test_split") or "test"
    shards = None
    if cfg.get("test_shards") is not None:
        from flip.data.datamodule import resolve_shards  # Lightning's import, only for shards

        shards = {split: resolve_shards(cfg["test_shards"], "test_shards")}
    benchmark = Benchmark.from_config(cfg["benchmark"], shards)
    return evaluate(
        model,
        benchmark,
        build_protocols(cfg["protocols"]),
        output_dir,
        split=split,
        max_samples=cfg.get("max_samples"),
        seed=cfg.get("seed", 0),
        checkpoint=checkpoint,
        model_id=model_id,
        cache=cache,
        batch_size=cfg["batch_size"],
        num_workers=cfg["num_workers"],
    )


def build_protocols(nodes: Mapping[str, Any]) -> dict[str, EvaluationProtocol]:
    """Protocols from their config nodes (name -> conf/protocol/<name>.yaml), in order."""
    built = {}
    for name, node in nodes.items():
        if node is None:  # removed in a config file (`linear_probe: null`)
            continue
        if "_target_" not in node:
            raise ValueError(
                f"protocols.{name} has no _target_: a protocol node names its class, e.g. "
                "protocol@protocols.linear_probe=linear_probe composes conf/protocol/linear_probe.yaml"
            )
        built[name] = instantiate(node, _convert_="all")
    return built
