"""Every metric per demographic group, and the gap between the best and the worst group.

A model can score well on average and badly for one gender, race or age group; the field's
studies of vision-language models' social perception of faces and of bias in face recognition
measure exactly that, and anyone deploying attribute queries needs to see it. Wherever a
benchmark names `subgroups` (conf/benchmark/<name>.yaml: the demographic questions of its
labels), each protocol reports its summary metrics per group of each of them, with the
group's support. A sample whose group label is missing (-1) is counted in no group; the
number of such samples is reported as `unlabelled`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flip.benchmarks.base import LabelledSplit
from flip.evaluation.multitask import MultitaskPredictions, higher_is_better


def subgroup_labels(
    split: LabelledSplit, subgroups: Sequence[str]
) -> dict[str, tuple[list[str], np.ndarray]]:
    """The group names and [N] group labels of each subgroup question of a split."""
    missing = [name for name in subgroups if name not in split.questions]
    if missing:
        raise ValueError(
            f"{split.benchmark}/{split.split}: subgroups {missing} are not questions of the split; "
            f"it has {list(split.questions)}"
        )
    return {name: split.questions[name] for name in subgroups}


def subgroup_metrics(
    predictions: MultitaskPredictions, groups: Mapping[str, tuple[Sequence[str], np.ndarray]]
) -> dict[str, dict[str, Any]]:
    """Per subgroup question: `groups` (group -> support and every summary metric over its
    samples), `gap` (metric -> the best and worst group among those with samples, and the
    absolute difference) and `unlabelled` (samples in no group)."""
    out = {}
    for name, (classes, labels) in groups.items():
        per_group = {}
        for index, group in enumerate(classes):
            mask = labels == index
            per_group[group] = {"support": int(mask.sum()), **predictions.scores(mask)}
        out[name] = {"groups": per_group, "gap": _gaps(per_group), "unlabelled": int((labels < 0).sum())}
    return out


def _gaps(per_group: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    metrics = [k for k in next(iter(per_group.values()), {}) if k != "support"]
    gaps = {}
    for metric in metrics:
        scored = {
            g: m[metric] for g, m in per_group.items() if m["support"] > 0 and not math.isnan(m[metric])
        }
        if not scored:
            continue
        pick = (max, min) if higher_is_better(metric) else (min, max)
        best, worst = pick[0](scored, key=scored.get), pick[1](scored, key=scored.get)
        gaps[metric] = {"gap": abs(scored[best] - scored[worst]), "best": best, "worst": worst}
    return gaps
