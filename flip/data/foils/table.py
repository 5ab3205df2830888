"""Foils for free-form captions from an editable table of attribute phrases.

FaceCaption-15M's captions and a folder's `.txt` files were written by people or models, so
there is no grammar to read them with: the table lists, per attribute, phrases a caption may
use and what each becomes in a foil (conf/data/foils/default.yaml; the format is in its
header). A phrase matches as whole words, case-insensitively, and the foil keeps its case
(`flip.data.foils.phrases`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from flip.data.foils.grammar import Candidate
from flip.data.foils.phrases import PhraseIndex, replace_span

__all__ = ["FoilTable", "load_table"]


class FoilTable:
    """attribute -> {phrase: [foil phrases]}; a phrase belongs to one attribute only."""

    def __init__(self, table: Mapping[str, Mapping[str, list[str]]], source: str = "the foil table") -> None:
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"{source}: expected a mapping attribute -> {{phrase: [foils]}}, got {table!r}")
        self.phrases: dict[str, tuple[str, tuple[str, ...]]] = {}  # phrase -> (attribute, foils)
        for attribute, entries in table.items():
            if not isinstance(entries, Mapping) or not entries:
                raise ValueError(
                    f"{source}: {attribute!r} is {entries!r}; accepted: a mapping phrase -> [foil phrases]"
                )
            for phrase, foils in entries.items():
                where = f"{source}: {attribute}.{phrase!r}"
                if isinstance(foils, str):
                    foils = [foils]
                if (
                    not isinstance(phrase, str)
                    or not phrase.strip()
                    or not isinstance(foils, list)
                    or not foils
                    or not all(isinstance(f, str) and f.strip() for f in foils)
                ):
                    raise ValueError(
                        f"{where} -> {foils!r}; accepted: a phrase -> a non-empty list of phrases"
                    )
                key = " ".join(phrase.lower().split())
                if key in self.phrases:
                    raise ValueError(
                        f"{where} is listed twice (also under {self.phrases[key][0]!r}); "
                        f"a phrase may stand for one attribute only"
                    )
                self.phrases[key] = (str(attribute), tuple(f.strip() for f in foils))
        self.index = PhraseIndex(self.phrases)

    def candidates(self, text: str) -> list[Candidate]:
        """Every foil of `text` that replaces one listed phrase by one of its foils."""
        out = []
        for match in self.index.find(text):
            attribute, foils = self.phrases[match.phrase]
            for foil in foils:
                out.append(
                    Candidate(replace_span(text, match.start, match.end, foil), attribute, match.phrase, foil)
                )
        return out


def load_table(path: str | Path) -> FoilTable:
    """The table in a YAML file; `yaml.safe_load` only (a table someone sends runs no code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.hard_negatives.table: no foil table at {str(path)!r}")
    with open(path, encoding="utf-8") as f:
        return FoilTable(yaml.safe_load(f), source=str(path))
