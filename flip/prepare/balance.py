"""MetaCLIP-style balancing: no metadata entry may contribute more than `max_per_entry` samples.

"Demystifying CLIP Data" (MetaCLIP, Xu et al. 2023) matches every caption against a list of
metadata entries and caps each entry's share, so a few head entries ("woman", "smiling")
cannot crowd out the tail ("monolid", "vitiligo"). Here the entries are the user's: a text
file, one entry per line, `|` between alternative phrasings of one entry (`beard | bearded`),
`#` starting a comment. A caption matches an entry when one of its phrases occurs in it as
whole words (`flip.prepare.caption_rules.words`: case-folded, any script, punctuation between
words not seen), so `hat` is not found in `that`. A caption matching several entries counts
for each of them.

Two rules, both deterministic for a `seed` and independent of the input's order (each sample
draws from a hash of seed and key, not from a shared random stream):

- `cap` (the default): a strict cap. Samples are taken rarest entry first (a sample's rarity
  is the count of its rarest entry; ties in a seeded random order), and a sample is kept when
  every entry it matches is still under the cap. No entry ever exceeds `max_per_entry`, and
  tail samples are taken before the head entries they share are full.
- `metaclip`: MetaCLIP's own sampling (its Algorithm 1): entry e with n_e matches is drawn
  with probability min(1, t / n_e), and a sample is kept when any entry it matches draws it,
  i.e. with probability 1 - prod_e (1 - min(1, t / n_e)). Entries with at most t matches keep
  every sample; a head entry keeps about t in expectation plus the samples that its rarer
  co-occurring entries keep, so it can exceed t.

Samples matching no entry are kept or dropped as the caller says (MetaCLIP's pool holds only
matching captions; for a face dataset the entries are usually a balancing list, not a filter).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flip.prepare.caption_rules import words

__all__ = ["RULES", "Balance", "Entry", "EntryMatcher", "balance", "read_entries"]

RULES = ("cap", "metaclip")


@dataclass(frozen=True)
class Entry:
    """One metadata entry: its name (its first phrase) and its phrases as word tuples."""

    name: str
    phrases: tuple[tuple[str, ...], ...]


def read_entries(path: str | os.PathLike) -> list[Entry]:
    """The entries of a file (one per line, `|` between phrasings, `#` comments); an entry named
    twice, or a line without words, is refused naming its line."""
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            phrases = tuple(tuple(words(p)) for p in text.split("|"))
            if not all(phrases):
                raise ValueError(
                    f"{path}, line {number}: {text!r} has a phrasing without words; expected "
                    "'phrase' or 'phrase | other phrase'"
                )
            name = " ".join(phrases[0])
            if name in seen:
                raise ValueError(f"{path}, line {number}: entry {name!r} is also on line {seen[name]}")
            seen[name] = number
            entries.append(Entry(name, phrases))
    if not entries:
        raise ValueError(f"{path} holds no entry; expected one entry (a phrase) per line")
    return entries


class EntryMatcher:
    """Finds the entries a caption holds by looking up its word n-grams: linear in the caption's
    length, whatever the number of entries (MetaCLIP's lists hold 500,000)."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries = list(entries)
        self.by_phrase: dict[tuple[str, ...], set[int]] = {}
        for index, entry in enumerate(self.entries):
            for phrase in entry.phrases:
                self.by_phrase.setdefault(phrase, set()).add(index)
        self.longest = max((len(p) for p in self.by_phrase), default=0)

    def match(self, caption: str) -> list[int]:
        """Indices of the entries `caption` matches, ascending."""
        tokens = words(caption)
        found: set[int] = set()
        for start in range(len(tokens)):
            for length in range(1, min(self.longest, len(tokens) - start) + 1):
                found |= self.by_phrase.get(tuple(tokens[start : start + length]), set())
        return sorted(found)


@dataclass
class Balance:
    """What balancing decided: per sample None (kept) or its skip reason, and per entry how many
    samples matched it before and after."""

    decisions: list[str | None]
    before: list[int]
    after: list[int]
    unmatched: int = 0
    rule: str = "cap"
    settings: dict = field(default_factory=dict)


def _uniform(seed: int, key: str, salt: str = "") -> float:
    """A number in [0, 1) that depends on seed, key and salt only: the same in any run and order."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{salt}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def balance(
    matches: Sequence[Sequence[int]],
    keys: Sequence[str],
    entry_count: int,
    max_per_entry: int,
    rule: str = "cap",
    seed: int = 0,
    keep_unmatched: bool = True,
) -> Balance:
    """Decides which samples stay (see the module docstring for the rules).

    `matches[i]` holds the entry indices sample i matches, `keys[i]` its key (what its draws
    are seeded by).
    """
    if rule not in RULES:
        raise ValueError(f"balance rule {rule!r}; accepted: {', '.join(RULES)}")
    if max_per_entry < 1:
        raise ValueError(f"max_per_entry={max_per_entry}; accepted: >= 1")
    before = np.zeros(entry_count, dtype=np.int64)
    for matched in matches:
        before[list(matched)] += 1
    decisions: list[str | None] = [None if keep_unmatched or m else "no_entry" for m in matches]
    after = np.zeros(entry_count, dtype=np.int64)
    matched_samples = [i for i, m in enumerate(matches) if m]
    if rule == "cap":
        order = sorted(
            matched_samples, key=lambda i: (int(before[list(matches[i])].min()), _uniform(seed, keys[i]))
        )
        for i in order:
            entries = list(matches[i])
            if (after[entries] < max_per_entry).all():
                after[entries] += 1
            else:
                decisions[i] = "entry_full"
    else:
        probability = np.minimum(1.0, max_per_entry / np.maximum(before, 1))
        for i in matched_samples:
            drawn = any(_uniform(seed, keys[i], str(e)) < probability[e] for e in matches[i])
            if drawn:
                after[list(matches[i])] += 1
            else:
                decisions[i] = "entry_sampled_out"
    unmatched = len(matches) - len(matched_samples)
    return Balance(
        decisions,
        before.tolist(),
        after.tolist(),
        unmatched,
        rule,
        {"max_per_entry": max_per_entry, "seed": seed, "keep_unmatched": keep_unmatched},
    )
