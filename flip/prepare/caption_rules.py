"""Caption rules for `flip-data curate`: length, and junk recognisable in any language.

Web alt-texts carry file names, URLs, runs of `!!!!!!` and strings of digits; a model learns
nothing about a face from them. The rules here use no word list and no language model, so
they treat a Chinese caption as they treat an English one:

- words are runs of letters, marks and digits (Unicode categories L, M, N), except that each
  Han, Hiragana or Katakana character is a word of its own (those scripts write no spaces);
  other scripts without spaces (Thai, ...) count one word per run;
- the letter fraction is letters and marks over every character that is not a space;
- a repeat is one non-space character more than `max_repeat` times in a row.

`words` is also how balancing (`flip.prepare.balance`) matches entries, so an entry is found
exactly where a word count would see its words.
"""

from __future__ import annotations

from dataclasses import dataclass

import regex

__all__ = ["CaptionRules", "words"]

_NO_SPACES = r"\p{Han}\p{Hiragana}\p{Katakana}"
_WORD = regex.compile(rf"[{_NO_SPACES}]|[[\p{{L}}\p{{M}}\p{{N}}]--[{_NO_SPACES}]]+", regex.V1)
_LETTER = regex.compile(r"[\p{L}\p{M}]")
_DOMAINS = "com|net|org|edu|gov|info|biz|io|co|me|tv|ru|cn|de|jp|uk|fr|it|nl|es|br|in|au|pl|xyz|top"
_URL = regex.compile(
    r"(?:https?|ftp)://\S+"  # a URL
    r"|\bwww\.\S+"  # a web address without its scheme
    r"|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"  # an e-mail address
    rf"|\b[\w-]+(?:\.[\w-]+)*\.(?:{_DOMAINS})\b(?:/\S*)?",  # a bare domain: example.com/page
    regex.IGNORECASE,
)


def words(text: str) -> list[str]:
    """The caption's words, case-folded (see the module docstring for what a word is)."""
    return _WORD.findall(text.casefold())


@dataclass(frozen=True)
class CaptionRules:
    """Bounds a caption must meet; None turns a bound off. The defaults pass any caption a person
    would write about a face and catch the common junk; `check` names the first rule broken."""

    min_words: int = 1
    max_words: int | None = None
    min_chars: int = 1
    max_chars: int | None = None
    min_letter_fraction: float = 0.5
    max_repeat: int | None = 5
    allow_urls: bool = False

    def __post_init__(self) -> None:
        for name in ("min_words", "min_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}; accepted: >= 0")
        for low, high in (("min_words", "max_words"), ("min_chars", "max_chars")):
            top = getattr(self, high)
            if top is not None and top < getattr(self, low):
                raise ValueError(f"{high}={top} is under {low}={getattr(self, low)}; accepted: >= {low}")
        if not 0.0 <= self.min_letter_fraction <= 1.0:
            raise ValueError(f"min_letter_fraction={self.min_letter_fraction}; accepted: 0..1")
        if self.max_repeat is not None and self.max_repeat < 1:
            raise ValueError(f"max_repeat={self.max_repeat}; accepted: >= 1 or None (no limit)")

    def check(self, caption: str) -> tuple[str, str] | None:
        """(skip reason, detail) of the first rule `caption` breaks, in the order length, URL,
        letters, repeats; None when it breaks none."""
        text = " ".join(caption.split())
        count, chars = len(words(text)), len(text)
        if count < self.min_words or chars < self.min_chars:
            return "caption_too_short", f"{count} words, {chars} characters: {text[:80]!r}"
        if (self.max_words is not None and count > self.max_words) or (
            self.max_chars is not None and chars > self.max_chars
        ):
            return "caption_too_long", f"{count} words, {chars} characters: {text[:80]!r}"
        if not self.allow_urls:
            found = _URL.search(text)
            if found is not None:
                return "caption_url", f"{found.group(0)[:60]!r} in {text[:80]!r}"
        visible = len(text) - text.count(" ")
        letters = len(_LETTER.findall(text))
        if visible == 0 or letters / visible < self.min_letter_fraction:
            return "caption_few_letters", f"{letters} letters of {visible} characters: {text[:80]!r}"
        if self.max_repeat is not None:
            run = regex.search(rf"(\S)\1{{{self.max_repeat},}}", text)
            if run is not None:
                return "caption_repeats", f"{run.group(0)[:20]!r} in {text[:80]!r}"
        return None
