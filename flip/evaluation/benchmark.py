"""A benchmark as evaluation uses it: a reader of its splits, their names, and its prompts.

Built from conf/benchmark/<name>.yaml (`Benchmark.from_config`), so eval/*.py, the end of
train.py and the in-training callback read the same splits the same way. Each loaded split is
kept, so a callback that evaluates every few hundred steps reads its images once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flip.benchmarks.base import LabelledSplit
from flip.benchmarks.shards import read_labelled_shards
from flip.config import plain
from flip.evaluation.aligned import AlignedImages, align_config
from flip.prepare.align import AlignConfig

log = logging.getLogger(__name__)

PROMPT_KEYS = ("templates", "binary", "multiclass", "classes", "age")


@dataclass
class Benchmark:
    """`reader(split=name)` returns a LabelledSplit; `prompts` holds the zero-shot prompts
    (templates, binary, multiclass, classes, age: see flip.evaluation.zeroshot). `subgroups` names
    the split's demographic questions (gender, race, age group): protocols report every metric
    per group of each, and the gap between the best and worst group. `align` puts every image's
    largest face on the five-point template first (flip.evaluation.aligned)."""

    name: str
    reader: Callable[..., LabelledSplit]
    prompts: dict[str, Any] = field(default_factory=dict)
    train_split: str | None = "train"
    val_split: str | None = None
    test_split: str = "test"
    subgroups: list[str] = field(default_factory=list)
    align: AlignConfig | None = None
    _loaded: dict[tuple[str, int | None, int], LabelledSplit] = field(
        default_factory=dict, init=False, repr=False
    )

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], shards: Mapping[str, Sequence[str]] | None = None
    ) -> Benchmark:
        """The benchmark of a conf/benchmark/<name>.yaml node (its `reader` a config or a callable).

        `shards` reads the named splits from labelled shards instead of the reader (train.py's
        `eval.test_shards`): the labels are the benchmark's `binary` and `multiclass` questions.
        """
        name = cfg.get("name")
        if isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, "root"):
            raise ValueError(
                f"benchmark.root is not set: give benchmark.root=DIR, the folder holding {name} "
                "in its published layout (see conf/benchmark/<name>.yaml and docs/evaluation.md)"
            )
        reader = cfg["reader"]
        if not callable(reader):  # a config node; already a partial when Hydra instantiated a parent
            reader = instantiate(reader)
        prompts = {k: plain(cfg.get(k)) for k in PROMPT_KEYS}
        if shards:
            reader = _ShardSplits(reader, dict(shards), prompts, name)
        return cls(
            name=name,
            reader=reader,
            prompts=prompts,
            train_split=cfg.get("train_split"),
            val_split=cfg.get("val_split"),
            test_split=cfg.get("test_split") or "test",
            subgroups=list(cfg.get("subgroups") or []),
            align=align_config(plain(cfg.get("align"))),
        )

    def load(self, split: str, max_samples: int | None = None, seed: int = 0) -> LabelledSplit:
        """A split as the reader gives it, or a seeded subsample of `max_samples` of it."""
        key = (split, max_samples, seed)
        if key not in self._loaded:
            self._loaded[key] = self._read(split).sample(max_samples, seed)
            labelled = self._loaded[key]
            counts = ", ".join(f"{k} {v}" for k, v in labelled.counts().items())
            log.info("%s/%s: %d samples (%s)", labelled.benchmark, split, len(labelled), counts)
        return self._loaded[key]

    def _read(self, split: str) -> LabelledSplit:
        labelled = self.reader(split=split)
        if len(labelled) == 0:
            raise ValueError(f"{self.name}: split {split!r} holds no samples")
        if labelled.skipped:
            reasons = ", ".join(f"{k} {v}" for k, v in labelled.skipped_by_reason.items())
            log.warning(
                "%s/%s: the reader left out %d record(s): %s",
                labelled.benchmark,
                split,
                labelled.skipped,
                reasons,
            )
        if self.align is not None:
            labelled = replace(labelled, images=AlignedImages(labelled.images, self.align))
        return labelled


@dataclass
class _ShardSplits:
    """A reader whose named splits come from labelled shards, the others from the benchmark's reader."""

    reader: Callable[..., LabelledSplit]
    shards: dict[str, Sequence[str]]
    prompts: Mapping[str, Any]
    benchmark: str

    def __call__(self, split: str) -> LabelledSplit:
        if split not in self.shards:
            return self.reader(split=split)
        questions = {q: list(classes) for q, classes in (self.prompts.get("multiclass") or {}).items()}
        attributes = list(self.prompts.get("binary") or {})
        return read_labelled_shards(self.shards[split], split, attributes, questions, self.benchmark)
