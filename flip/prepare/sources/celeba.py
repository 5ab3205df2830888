"""`flip-data celeba`: CelebA's 40 attributes turned into captions, one sample per image.

Captions come from `CELEBA_GRAMMAR` through the same engine that captions FaceShapes, each
from a random stream seeded by (seed, image key) alone, so a rerun, a resume or another
worker count writes the same caption for the same image. The `.json` keeps all 40
attributes (as booleans, at the top level as in FaceShapes), the split, and what the caption
claims (`mentions`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flip.benchmarks.celeba import CELEBA_SPLITS, read_celeba
from flip.data.captions import CaptionGrammar
from flip.data.celeba_grammar import CELEBA_GRAMMAR
from flip.prepare.report import SkipLog
from flip.prepare.writer import ImageRef, Item

__all__ = ["CelebASource"]


@dataclass
class CelebASource:
    root: Path
    split: str = "train"
    seed: int = 0
    command: str = "celeba"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.split != "all" and self.split not in CELEBA_SPLITS:
            raise ValueError(f"split={self.split!r}; accepted: {', '.join(CELEBA_SPLITS)}, all")
        self._outside: Counter[str] = Counter()
        self._records = read_celeba(
            self.root, None if self.split == "all" else self.split, skipped=self._outside
        )
        self._grammar = CaptionGrammar(CELEBA_GRAMMAR)

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "split": self.split, "seed": self.seed, "images": len(self._records)}

    def total(self) -> int:
        return len(self._records) + sum(self._outside.values())

    def caption(self, key: str, attributes: dict[str, bool]):
        return self._grammar.caption(attributes, random.Random(f"celeba/{self.seed}/{key}"))

    def items(self, skips: SkipLog) -> Iterator[Item]:
        for reason, count in self._outside.items():
            skips.add(
                reason,
                str(self.root),
                "image names in the attribute file lead outside the image folder",
                count,
            )
        for record in self._records:
            caption = self.caption(record.key, record.attributes)
            metadata = {
                **record.attributes,
                "split": record.split,
                "image_name": record.image.name,
                "mentions": [[name, value] for name, value in caption.mentions],
            }
            yield Item(record.key, ImageRef(str(record.image)), caption.text, metadata)
