"""Our results as CLIP_benchmark's result files, so that its `clip_benchmark build` merges FLIP's
figures with figures it computed itself into one CSV table.

CLIP_benchmark (github.com/LAION-AI/CLIP_benchmark) writes one JSON file per evaluation,
`{dataset}_{pretrained}_{model}_{language}_{task}.json`, holding `dataset`, `model`,
`pretrained`, `task`, `language` and a flat `metrics` dict; `build` turns every file into one
CSV row (the metrics become columns, plus `model_fullname` = "model pretrained"). It has three
tasks our protocols also run, and this module writes only what means the same on both sides:

- `zeroshot_classification`: `acc1` (our `accuracy`) and `mean_per_class_recall` (sklearn's
  balanced accuracy there, the mean recall over the classes present here: the same number).
  `acc5` is left out: metrics.json keeps each image's top class, not its top five.
- `linear_probe`: `lp_acc1` and `lp_mean_per_class_recall` of our probe's largest training
  fraction (the honest figure, never the as-published one), and `normalized` (our image
  features are L2-normalised before the probe, as its `--normalize` does). Its `lp_acc5`,
  `weight_decay`, `epochs`, `seed` and `fewshot_k` describe its AdamW probe, not our L-BFGS one,
  so they are left out rather than filled with numbers that mean something else.
- `zeroshot_retrieval`: `image_retrieval_recall@K` is text->image (each caption finds its
  image among the top K, averaged over captions: our `t2i_R@K`) and `text_retrieval_recall@K`
  is image->text (any of an image's captions among its top K, averaged over images: our
  `i2t_R@K`), as its zeroshot_retrieval.py computes them.

Multi-label attributes (CelebA, LFWA, including their multi-class questions), multitask
splits (UTKFace, FairFace), face verification and any other protocol have no CLIP_benchmark
task: they give no record and keep our metrics.json only. The retrieval a zero-shot run adds
on a captioned split is left to the retrieval protocol's record (the same figures), so a
table never holds two rows of one model's retrieval on one dataset.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flip.atomic import write_json_atomic

__all__ = ["TASKS", "clip_benchmark_records", "write_clip_benchmark_records"]

ZEROSHOT_CLASSIFICATION = "zeroshot_classification"
LINEAR_PROBE = "linear_probe"
ZEROSHOT_RETRIEVAL = "zeroshot_retrieval"
TASKS = (ZEROSHOT_CLASSIFICATION, LINEAR_PROBE, ZEROSHOT_RETRIEVAL)
# our retrieval key -> CLIP_benchmark's: i2t is its text retrieval, t2i its image retrieval
RETRIEVAL_KEY = re.compile(r"^(i2t|t2i)_R@(\d+)$")
RERANKED = ("i2t_rerank_R@", "t2i_rerank_R@")
RETRIEVAL_NAMES = {"i2t": "text_retrieval_recall@{}", "t2i": "image_retrieval_recall@{}"}


def clip_benchmark_records(
    metrics: Mapping[str, Any], dataset: str, model: str, pretrained: str, language: str = "en"
) -> list[tuple[str, dict[str, Any]]]:
    """(file name, record) pairs in CLIP_benchmark's result format for one metrics.json.

    `dataset`, `model` and `pretrained` are what CLIP_benchmark's table shows in its columns
    of those names (its `--dataset`, `--model`, `--pretrained`). One protocol gives at most one
    record, of the one CLIP_benchmark task it matches; results CLIP_benchmark cannot express
    give [] (module docstring).
    """
    for name, value in (("dataset", dataset), ("model", model), ("language", language)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"a CLIP_benchmark record needs a non-empty {name}, got {value!r}")
    if not isinstance(pretrained, str):
        raise ValueError(f"pretrained must be a string ('' for none), got {pretrained!r}")
    protocol, task = metrics.get("protocol"), metrics.get("task")
    if protocol == "zeroshot" and task == "classification":
        summary = _summary(metrics, "accuracy", "mean_per_class_recall")
        cb_task = ZEROSHOT_CLASSIFICATION
        values = {"acc1": summary["accuracy"], "mean_per_class_recall": summary["mean_per_class_recall"]}
    elif protocol == "linear_probe" and task == "classification":
        summary = _summary(metrics, "accuracy", "mean_per_class_recall")
        cb_task = LINEAR_PROBE
        values = {
            "lp_acc1": summary["accuracy"],
            "lp_mean_per_class_recall": summary["mean_per_class_recall"],
            "normalized": True,  # flip.evaluation.features L2-normalises every image feature
        }
    elif protocol == "retrieval":
        cb_task, values = ZEROSHOT_RETRIEVAL, _retrieval(metrics.get("summary") or {})
    else:
        return []
    record = {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": cb_task,
        "metrics": values,
        "language": language,
    }
    return [(clip_benchmark_file_name(dataset, model, pretrained, language, cb_task), record)]


def clip_benchmark_file_name(dataset: str, model: str, pretrained: str, language: str, task: str) -> str:
    """CLIP_benchmark's default `--output` template. A '/' in a name (a `wds/...` dataset, a
    `local-dir:/path` model, a weights path) becomes '_', as it does for datasets, so the
    name stays one file in the folder rather than a path into folders that do not exist."""
    parts = [str(p).replace("/", "_") for p in (dataset, pretrained, model, language, task)]
    return "{}_{}_{}_{}_{}.json".format(*parts)


def write_clip_benchmark_records(
    records: Iterable[tuple[str, Mapping[str, Any]]], folder: str | os.PathLike
) -> list[Path]:
    """Each record into `folder`/its file name, whole or not at all (a killed suite never leaves
    half a JSON file for `clip_benchmark build` to choke on). Returns the paths written."""
    folder = Path(folder)
    written = []
    for name, record in records:
        if Path(name).name != name or name in (".", "..") or not name.endswith(".json"):
            raise ValueError(f"a CLIP_benchmark result file name must be a plain '*.json' name, got {name!r}")
        write_json_atomic(folder / name, dict(record))
        written.append(folder / name)
    return written


def _summary(metrics: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    summary = metrics.get("summary") or {}
    missing = [k for k in keys if k not in summary]
    if missing:
        raise ValueError(
            f"{metrics.get('protocol')} metrics of {metrics.get('benchmark')!r} have no summary "
            f"{', '.join(missing)}; a classification metrics.json has summary.accuracy and "
            "summary.mean_per_class_recall"
        )
    return summary


def _retrieval(recalls: Mapping[str, Any]) -> dict[str, float]:
    """Our `i2t_R@K` / `t2i_R@K` under CLIP_benchmark's names, in order of name and K."""
    if not recalls:
        raise ValueError("retrieval metrics have no summary recalls (i2t_R@K, t2i_R@K) to write")
    out = {}
    for key, value in recalls.items():
        if key.startswith(RERANKED):
            continue  # ITM re-ranked recalls (rerank_k): CLIP_benchmark has no name for them
        match = RETRIEVAL_KEY.match(key)
        if match is None:
            raise ValueError(
                f"retrieval metric {key!r} is not one of ours (i2t_R@K or t2i_R@K), so it has no "
                "CLIP_benchmark name"
            )
        out[RETRIEVAL_NAMES[match.group(1)].format(int(match.group(2)))] = value
    return dict(sorted(out.items(), key=lambda item: (item[0].split("@")[0], int(item[0].split("@")[1]))))
