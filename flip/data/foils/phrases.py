"""Finding attribute phrases in a caption and putting another phrase in their place.

Both foil sources (the caption grammars and the editable table) work on the caption's text
the same way: a phrase matches only as whole words (a hyphen counts as part of a word, so
"bald" does not match inside "bald-headed"), case-insensitively; longer phrases are matched
first at each place and matches never overlap ("who is not bald" is one match, not a "bald"
inside it).
A replacement keeps the case of what it replaces ("Glasses" -> "No glasses", "GLASSES" ->
"NO GLASSES") and the indefinite article in front of it agrees with it ("an angry person" ->
"a happy person").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Match", "PhraseIndex", "find_phrases", "replace_span"]

_VOWELS = "aeiou"
_ARTICLE = re.compile(r"(?<![\w-])(an?)(\s+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Match:
    """`phrase` (as listed, lower case) found at text[start:end]."""

    phrase: str
    start: int
    end: int


def _words(phrase: str) -> str:
    return r"\s+".join(re.escape(word) for word in phrase.split())


class PhraseIndex:
    """Finds a fixed set of phrases: one pattern, longest phrase first at each place."""

    def __init__(self, phrases: Iterable[str]) -> None:
        phrases = sorted(
            {" ".join(p.lower().split()) for p in phrases if p.strip()}, key=lambda p: (-len(p), p)
        )
        alternatives = "|".join(_words(p) for p in phrases)
        self.pattern = (
            re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE) if phrases else None
        )

    def find(self, text: str) -> list[Match]:
        """Non-overlapping whole-word occurrences in `text`, in text order."""
        if self.pattern is None:
            return []
        return [
            Match(" ".join(m.group(0).lower().split()), m.start(), m.end())
            for m in self.pattern.finditer(text)
        ]


def find_phrases(text: str, phrases: Iterable[str]) -> list[Match]:
    """Non-overlapping whole-word occurrences of `phrases` in `text`, in text order: scanning
    from the left, the longest phrase that matches at a place is taken."""
    return PhraseIndex(phrases).find(text)


def _same_case(original: str, replacement: str) -> str:
    letters = [c for c in original if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return replacement.upper()
    if letters and original.lstrip()[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def replace_span(text: str, start: int, end: int, replacement: str) -> str:
    """`text` with text[start:end] replaced, in its case, and a preceding "a"/"an" made to agree."""
    new = _same_case(text[start:end], replacement)
    head = text[:start]
    article = _ARTICLE.search(head)
    if article is not None:
        word = _same_case(article.group(1), "an" if new[:1].lower() in _VOWELS else "a")
        head = head[: article.start(1)] + word + article.group(2)
    return head + new + text[end:]
