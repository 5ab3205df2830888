"""Attribute foils (a caption with exactly one attribute changed): hard negatives, binding metric."""

from flip.data.foils.grammar import Candidate, GrammarFoils
from flip.data.foils.maker import (
    DEFAULT_TABLE,
    FORMS,
    SOURCES,
    WORDINGS,
    FoilMaker,
    hard_negatives,
    stable_seed,
)
from flip.data.foils.phrases import find_phrases, replace_span
from flip.data.foils.table import FoilTable, load_table

__all__ = [
    "DEFAULT_TABLE",
    "FORMS",
    "SOURCES",
    "WORDINGS",
    "Candidate",
    "FoilMaker",
    "FoilTable",
    "GrammarFoils",
    "find_phrases",
    "hard_negatives",
    "load_table",
    "replace_span",
    "stable_seed",
]
