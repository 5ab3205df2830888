"""Skip bookkeeping and the final JSON report written next to the shards.

Every sample that does not make it into a shard is counted under one reason (see
`hygiene.REASONS`), with a few examples per reason, so a user can tell a handful of broken
downloads from a systematic problem (a wrong column name, boxes in the wrong format). The
report's file name is part of the output folder's layout (`flip.data.shards.REPORT_NAME`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from flip.prepare.hygiene import REASONS

__all__ = ["SkipLog"]

EXAMPLES_PER_REASON = 10


class SkipLog:
    """Counts skipped samples by reason and keeps the first few examples of each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, str]]] = {}

    def add(self, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(REASONS)}")
        self.counts[reason] += count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append({"sample": where, "detail": detail[:300]})

    def merge(self, other: SkipLog | dict) -> None:
        counts, examples = (
            (other.counts, other.examples)
            if isinstance(other, SkipLog)
            else (other["counts"], other["examples"])
        )
        self.counts.update(counts)
        for reason, items in examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(items[: max(0, EXAMPLES_PER_REASON - len(kept))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "examples": dict(sorted(self.examples.items()))}
