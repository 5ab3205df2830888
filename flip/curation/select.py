"""Which scanned samples `flip-data curate` keeps: the filters, applied in a fixed order.

1. samples the scan could not use (no image, undecodable, no caption, bad `.json`);
2. caption rules (`flip.prepare.caption_rules`);
3. exact duplicates, then near duplicates, then embedding duplicates (`flip.prepare.dedup`);
4. image-text agreement: a minimum cosine, or the top fraction of the samples still in;
5. balancing (`flip.prepare.balance`) over the samples still in.

A sample removed by a filter is counted under that filter only, and a later filter sees only
the samples still in: a near duplicate of a sample whose caption was junk is kept (its junk
copy is gone), and the top fraction and the entry counts are of the samples that would
otherwise be written. Every step is deterministic: the first copy in input order wins, ties in
score go to the earlier sample, and balancing draws from seeded hashes of the keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flip.curation.scan import Sample
from flip.prepare.balance import RULES, Balance, Entry, EntryMatcher, balance
from flip.prepare.caption_rules import CaptionRules
from flip.prepare.dedup import HASHES, NearDuplicates, embedding_duplicates, hamming

__all__ = ["DEDUP_MODES", "DEDUP_ON", "Filters", "Selection", "select"]

DEDUP_MODES = ("none", "exact", "near")
DEDUP_ON = ("image", "pair")


@dataclass(frozen=True)
class Filters:
    """Every setting of the filters (the `flip-data curate` flags of the same names)."""

    captions: CaptionRules = field(default_factory=CaptionRules)
    dedup: str = "near"
    dedup_on: str = "image"
    hash_kind: str = "phash"
    max_hash_distance: int = 8
    min_embedding_cosine: float | None = None
    min_agreement: float | None = None
    keep_top_fraction: float | None = None
    max_per_entry: int | None = None
    balance_rule: str = "cap"
    keep_unmatched: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dedup not in DEDUP_MODES:
            raise ValueError(f"dedup={self.dedup!r}; accepted: {', '.join(DEDUP_MODES)}")
        if self.dedup_on not in DEDUP_ON:
            raise ValueError(f"dedup_on={self.dedup_on!r}; accepted: {', '.join(DEDUP_ON)}")
        if self.hash_kind not in HASHES:
            raise ValueError(f"hash={self.hash_kind!r}; accepted: {', '.join(HASHES)}")
        if not 0 <= self.max_hash_distance <= 31:
            raise ValueError(f"max_hash_distance={self.max_hash_distance}; accepted: 0..31 (bits of 64)")
        if self.min_agreement is not None and self.keep_top_fraction is not None:
            raise ValueError("give --min-agreement or --keep-top-fraction, not both")
        if self.keep_top_fraction is not None and not 0 < self.keep_top_fraction <= 1:
            raise ValueError(f"keep_top_fraction={self.keep_top_fraction}; accepted: 0 < f <= 1")
        if self.balance_rule not in RULES:
            raise ValueError(f"balance={self.balance_rule!r}; accepted: {', '.join(RULES)}")
        if self.max_per_entry is not None and self.max_per_entry < 1:
            raise ValueError(f"max_per_entry={self.max_per_entry}; accepted: >= 1")

    @property
    def needs_model(self) -> bool:
        return (
            self.min_embedding_cosine is not None
            or self.min_agreement is not None
            or self.keep_top_fraction is not None
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Selection:
    """Per sample: None (kept) or the reason it is removed, and a detail naming e.g. the sample it
    duplicates; the agreement threshold in effect and what balancing decided."""

    reasons: list[str | None]
    details: list[str]
    threshold: float | None = None
    balance: Balance | None = None

    @property
    def kept(self) -> list[int]:
        return [i for i, r in enumerate(self.reasons) if r is None]


def _captions(samples: Sequence[Sample], sel: Selection, rules: CaptionRules) -> None:
    for i in sel.kept:
        broken = rules.check(samples[i].caption)
        if broken is not None:
            sel.reasons[i], sel.details[i] = broken


def _duplicates(samples: Sequence[Sample], names: Sequence[str], sel: Selection, filters: Filters) -> None:
    pair = filters.dedup_on == "pair"
    first: dict[tuple, int] = {}
    for i in sel.kept:
        key = (samples[i].pixels, samples[i].caption if pair else None)
        if key in first:
            j = first[key]
            sel.reasons[i], sel.details[i] = "exact_duplicate", f"the same pixels as {names[j]}"
        else:
            first[key] = i
    if filters.dedup != "near":
        return
    indexes: dict[str | None, NearDuplicates] = {}  # one per caption with --dedup-on pair
    for i in sel.kept:
        value, group = int(samples[i].phash, 16), samples[i].caption if pair else None
        index = indexes.setdefault(group, NearDuplicates(filters.max_hash_distance))
        j = index.find(value)
        if j is None:
            index.add(value, i)
        else:
            bits = int(hamming(np.array([value], dtype=np.uint64), int(samples[j].phash, 16))[0])
            sel.reasons[i], sel.details[i] = "near_duplicate", f"{bits} bits from {names[j]}"


def _embedding_duplicates(
    samples: Sequence[Sample], names: Sequence[str], sel: Selection, features: np.ndarray, filters: Filters
) -> None:
    rows = [i for i in sel.kept if np.isfinite(features[i]).all()]
    groups = [samples[i].caption for i in rows] if filters.dedup_on == "pair" else None
    found = embedding_duplicates(features[rows].astype(np.float32), filters.min_embedding_cosine, groups)
    for row, earlier in found.items():
        i, j = rows[row], rows[earlier]
        cosine = float(features[i].astype(np.float32) @ features[j].astype(np.float32))
        sel.reasons[i], sel.details[i] = "embedding_duplicate", f"cosine {cosine:.4f} with {names[j]}"


def _agreement(scores: np.ndarray, sel: Selection, filters: Filters) -> None:
    alive = sel.kept
    for i in alive:
        if not np.isfinite(scores[i]):
            sel.reasons[i], sel.details[i] = "corrupt_image", "the scoring model could not read the image"
    alive = [i for i in alive if np.isfinite(scores[i])]
    if filters.min_agreement is not None:
        sel.threshold = filters.min_agreement
        low = [i for i in alive if scores[i] < filters.min_agreement]
    elif filters.keep_top_fraction is not None and alive:
        ranked = sorted(alive, key=lambda i: (-scores[i], i))
        keep = max(1, math.ceil(filters.keep_top_fraction * len(ranked)))
        sel.threshold = float(scores[ranked[keep - 1]])
        low = ranked[keep:]
    else:
        return
    for i in low:
        sel.reasons[i], sel.details[i] = "low_agreement", f"cosine {scores[i]:.6f} < {sel.threshold:.6f}"


def _balance(samples: Sequence[Sample], sel: Selection, entries: Sequence[Entry], filters: Filters) -> None:
    matcher = EntryMatcher(entries)
    alive = sel.kept
    matches = [matcher.match(samples[i].caption) for i in alive]
    sel.balance = balance(
        matches,
        [samples[i].key for i in alive],
        len(entries),
        filters.max_per_entry,
        filters.balance_rule,
        filters.seed,
        filters.keep_unmatched,
    )
    for i, matched, decision in zip(alive, matches, sel.balance.decisions, strict=True):
        if decision is not None:
            names = ", ".join(repr(entries[e].name) for e in matched) or "none"
            sel.reasons[i], sel.details[i] = decision, f"entries {names}"


def select(
    samples: Sequence[Sample],
    names: Sequence[str],
    filters: Filters,
    scores: np.ndarray | None = None,
    features: np.ndarray | None = None,
    entries: Sequence[Entry] | None = None,
) -> Selection:
    """Runs the filters over `samples` (named in details by `names`, e.g. `00003.tar#key`);
    `scores`/`features` are the agreement scores and image features (NaN where missing),
    `entries` the balancing entries (with `filters.max_per_entry`)."""
    sel = Selection([s.problem for s in samples], [s.detail for s in samples])
    _captions(samples, sel, filters.captions)
    if filters.dedup != "none":
        _duplicates(samples, names, sel, filters)
    if filters.min_embedding_cosine is not None:
        if features is None:
            raise ValueError("--min-embedding-cosine needs a model (--model or --open-clip)")
        _embedding_duplicates(samples, names, sel, features, filters)
    if filters.min_agreement is not None or filters.keep_top_fraction is not None:
        if scores is None:
            raise ValueError("--min-agreement and --keep-top-fraction need a model (--model or --open-clip)")
        _agreement(scores, sel, filters)
    if entries is not None:
        if filters.max_per_entry is None:
            raise ValueError("balancing entries need --max-per-entry")
        _balance(samples, sel, entries, filters)
    return sel
