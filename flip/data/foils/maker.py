"""`data.hard_negatives`: which foils each training caption gets, seeded per sample.

A foil is the caption with exactly one attribute changed; the loss scores it as an extra
negative for its own image (`flip.losses.foils`), which tells the text tower that "with a
mustache" and "without a mustache" are not the same caption. Foils come from the caption
grammar that wrote the caption when the sample's `.json` says which (FaceShapes, CelebA
prepared by flip-data: attributes and `mentions`), and from the editable phrase table
otherwise (`source: auto`); `grammar` or `table` uses one only. A caption none of them can
change gets no foil and is masked out of the loss; the trainer logs the fraction that got one.

Each sample's foils are drawn from a generator seeded by the sample's `__seed__` (its place
in the training stream, `SkipConsumed`), so a resumed run makes the same foils as the run it
continues; without one (evaluation) by its key and caption.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from flip.config import CONFIG_PATH
from flip.data.captions import CaptionGrammar
from flip.data.foils.grammar import Candidate, GrammarFoils
from flip.data.foils.statements import group_size, statement_groups
from flip.data.foils.table import FoilTable, load_table

__all__ = ["DEFAULT_TABLE", "FORMS", "SOURCES", "WORDINGS", "FoilMaker", "hard_negatives", "stable_seed"]

SOURCES = ("auto", "grammar", "table")
# caption: the caption with one attribute changed; statement: an attribute said alone, in a group
# with its other values (flip.data.foils.statements)
FORMS = ("caption", "statement")
# varied: any noun and phrasing the grammar could write; plain: its first noun and each value's
# first phrasing (flip.data.foils.statements says what each costs)
WORDINGS = ("varied", "plain")
DEFAULT_TABLE = Path(CONFIG_PATH) / "data" / "foils" / "default.yaml"
_KEYS = ("source", "per_caption", "table", "attributes", "fraction", "form", "wording")


# CelebA labels each hair colour as an attribute of its own, with no phrase for its absence:
# its hair colour foils swap one stated colour for another the labels say is absent
CELEBA_EXCLUSIVE = {"hair_color": ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")}


def _grammars() -> dict[str, GrammarFoils]:
    from flip.data.celeba_grammar import CELEBA_GRAMMAR
    from flip.data.faceshapes.grammar import FACESHAPES_GRAMMAR

    return {
        "faceshapes": GrammarFoils(CaptionGrammar(FACESHAPES_GRAMMAR)),
        "celeba": GrammarFoils(CaptionGrammar(CELEBA_GRAMMAR), exclusive=CELEBA_EXCLUSIVE),
    }


def stable_seed(*parts: object) -> int:
    """A seed from strings, the same in every process (Python's `hash` of a str is not)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class FoilMaker:
    """Picks up to `per_caption` foils per caption, changing different attributes where it can.

    Picklable (loader workers get a copy); grammars and the table are built on first use.
    """

    source: str = "auto"
    per_caption: int = 1
    table: str | None = None  # None: conf/data/foils/default.yaml
    seed: int = 0
    # only foils that change one of these attributes (None: any). With per_caption >= the
    # other values' count, a caption gets every other value of the attribute as a foil: the
    # image must tell them apart, as a classifier over the attribute's captions would.
    # A mapping {name: weight} also sets how often each attribute is foiled: a caption's
    # attributes are drawn in turn with probability proportional to their weights, so that
    # with per_caption below their number the heavier ones get the foils
    attributes: tuple[str, ...] | Mapping[str, float] | None = None
    # the share of captions that get foils at all, each drawn by its sample's seed: the text
    # tower encodes only the foils that exist, so 0.5 halves what foils cost a step (and the
    # gradient they give, which the choice term's weight can make up)
    fraction: float = 1.0
    # caption: `per_caption` foils, each the caption with one attribute changed; statement:
    # `per_caption` groups, each an attribute the caption states said alone and then with each
    # of its other values (`flip.data.foils.statements`), for the grammar's records only
    form: str = "caption"
    # statements only: varied (any noun and phrasing of the grammar) or plain (one noun, each
    # value's first phrasing: a batch's statements are the same few dozen, encoded once each)
    wording: str = "varied"
    weights: dict[str, float] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(
                f"data.hard_negatives.source={self.source!r}; accepted: {', '.join(SOURCES)} (grammar: "
                f"the caption grammar of FaceShapes or CelebA samples; table: the phrase table; auto: "
                f"the grammar where a sample's .json allows, else the table)"
            )
        if (
            isinstance(self.per_caption, bool)
            or not isinstance(self.per_caption, int)
            or self.per_caption < 1
        ):
            raise ValueError(
                f"data.hard_negatives.per_caption={self.per_caption!r}; accepted: an integer >= 1"
            )
        if (
            isinstance(self.fraction, bool)
            or not isinstance(self.fraction, int | float)
            or not 0.0 < self.fraction <= 1.0
        ):
            raise ValueError(
                f"data.hard_negatives.fraction={self.fraction!r}; accepted: a number in (0, 1], the "
                f"share of captions that get foils (1: every caption that has one)"
            )
        if self.form not in FORMS:
            raise ValueError(
                f"data.hard_negatives.form={self.form!r}; accepted: caption (the caption with one "
                f"attribute changed) or statement (one attribute said alone, against its other values)"
            )
        if self.form == "statement" and self.source != "grammar":
            raise ValueError(
                f"data.hard_negatives.form=statement needs source=grammar, not {self.source!r}: a "
                f"statement says what the sample's .json says its caption states (its `mentions`)"
            )
        if self.wording not in WORDINGS:
            raise ValueError(
                f"data.hard_negatives.wording={self.wording!r}; accepted: varied (any noun and "
                f"phrasing the grammar has) or plain (its first noun and each value's first phrasing)"
            )
        if self.wording != "varied" and self.form != "statement":
            raise ValueError(
                f"data.hard_negatives.wording={self.wording!r} words statements; with "
                f"form={self.form!r} a foil keeps its caption's words. Set form=statement or drop wording"
            )
        if self.attributes is not None:
            names = self.attributes
            if isinstance(names, Mapping):
                self.weights = _weights(names)
                names = list(self.weights)
            if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    f"data.hard_negatives.attributes={names!r}; accepted: null (foils change any "
                    f"attribute), a non-empty list of attribute names, e.g. [expression, mustache], "
                    f"or a mapping of names to weights, e.g. {{expression: 4, mustache: 1}}"
                )
            self.attributes = tuple(names)
        if self.source != "grammar":
            _ = self.phrase_table  # a bad table fails at start-up, not in a loader worker

    @property
    def slot_shape(self) -> tuple[int, ...]:
        """The foil slots of each caption: (per_caption,) foils, or (per_caption, values) statements,
        `values` the most any allowed attribute has (a group with fewer leaves slots empty)."""
        if self.form == "caption":
            return (self.per_caption,)
        return (self.per_caption, self.group_size)

    @cached_property
    def group_size(self) -> int:
        names = None if self.attributes is None else tuple(self.attributes)
        return max(group_size(foils.grammar, names) for foils in self.grammars.values())

    @property
    def needs_json(self) -> bool:
        return self.source != "table"

    @cached_property
    def grammars(self) -> dict[str, GrammarFoils]:
        return _grammars()

    @cached_property
    def phrase_table(self) -> FoilTable:
        return load_table(self.table or DEFAULT_TABLE)

    def _grammar_for(self, record: Mapping[str, Any]) -> GrammarFoils | None:
        """The grammar that wrote a record's caption: the one knowing every attribute it mentions
        (or, without `mentions`, the most of its keys)."""
        mentions = record.get("mentions")
        if isinstance(mentions, list) and mentions:
            names = [m[0] for m in mentions if isinstance(m, list | tuple) and m]
            for foils in self.grammars.values():
                if foils.knows(names) == len(names):
                    return foils
            return None
        best = max(self.grammars.values(), key=lambda g: g.knows(list(record)))
        return best if best.knows(list(record)) else None

    def candidates(self, text: str, record: Mapping[str, Any] | None = None) -> list[Candidate]:
        """Every single-attribute foil of `text`, by this maker's source."""
        if self.source != "table" and isinstance(record, Mapping):
            grammar = self._grammar_for(record)
            if grammar is not None:
                mentions = record.get("mentions")
                found = grammar.candidates(text, record, mentions if isinstance(mentions, list) else None)
                if found or self.source == "grammar":
                    return found
        if self.source == "grammar":
            return []
        return self.phrase_table.candidates(text)

    def pick(self, candidates: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
        """Up to `per_caption` distinct foils, one changed attribute after another in random order
        (of `attributes` only, when given; weighted by them when they are a mapping), every new
        value of every attribute before a second phrasing of any."""
        by_attribute: dict[str, list[Candidate]] = {}
        for candidate in candidates:
            if self.attributes is not None and candidate.attribute not in self.attributes:
                continue
            if candidate.text not in {c.text for c in by_attribute.get(candidate.attribute, [])}:
                by_attribute.setdefault(candidate.attribute, []).append(candidate)
        attributes = sorted(by_attribute)
        if self.weights is None:
            rng.shuffle(attributes)
        else:
            attributes = _weighted_order(attributes, self.weights, rng)
        # every attribute's new values (rank 0: a value's first phrasing) before any value's
        # second phrasing: round after round over the attributes within each rank
        queue = []
        for order, name in enumerate(attributes):
            ranked = _new_values_first(by_attribute[name], rng)
            rounds: dict[int, int] = {}
            for rank, candidate in ranked:
                queue.append(((rank, rounds.get(rank, 0), order), candidate))
                rounds[rank] = rounds.get(rank, 0) + 1
        queue.sort(key=lambda item: item[0])
        return [candidate for _, candidate in queue[: self.per_caption]]

    def rng_for(self, sample: Mapping[str, Any]) -> random.Random:
        seed = sample.get("__seed__")
        if seed is None:
            return random.Random(stable_seed("foils", self.seed, sample.get("__key__", ""), sample["text"]))
        return random.Random(stable_seed("foils", self.seed, seed))

    def statements(self, record: Mapping[str, Any] | None, rng: random.Random) -> list[Candidate | None]:
        """The statement groups of a record (`form: statement`), flat, None in empty slots."""
        grammar = self._grammar_for(record) if isinstance(record, Mapping) else None
        mentions = record.get("mentions") if grammar is not None else None
        if not isinstance(mentions, list):
            return []
        allowed = self.attributes
        claimed = [
            (str(m[0]), m[1])
            for m in mentions
            if isinstance(m, list | tuple) and len(m) == 2 and (allowed is None or m[0] in allowed)
        ]
        values = grammar._record(record)
        if values is None:
            return []
        count, size = self.slot_shape
        plain = self.wording == "plain"
        return statement_groups(grammar, values, claimed, count, size, rng, self.weights, plain)

    def __call__(self, sample: Mapping[str, Any]) -> list[Candidate | None]:
        """The foils of one decoded sample ({"text", "json"?, "__seed__"?}); with `form: statement`
        its statement groups, None in the slots a group leaves empty."""
        rng = self.rng_for(sample)
        if self.fraction < 1.0 and rng.random() >= self.fraction:
            return []
        if self.form == "statement":
            return self.statements(sample.get("json"), rng)
        candidates = self.candidates(sample["text"], sample.get("json"))
        return self.pick(candidates, rng) if candidates else []


def _weights(weights: Mapping[str, Any]) -> dict[str, float]:
    """`attributes` as a mapping: each weight a finite number above 0, or the key is refused."""
    checked = {}
    for name, weight in weights.items():
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise ValueError(
                f"data.hard_negatives.attributes.{name}={weight!r}; accepted: a weight above 0 "
                f"(how often a caption's {name} is foiled relative to its other attributes)"
            )
        checked[str(name)] = float(weight)
    return checked


def _weighted_order(names: list[str], weights: Mapping[str, float], rng: random.Random) -> list[str]:
    """`names` drawn one after another without replacement, each with probability proportional
    to its weight among those left (Efraimidis and Spirakis: sort by u ** (1 / weight))."""
    keys = {name: rng.random() ** (1.0 / weights[name]) for name in names}
    return sorted(names, key=lambda name: -keys[name])


def _new_values_first(candidates: list[Candidate], rng: random.Random) -> list[tuple[int, Candidate]]:
    """One attribute's foils in random order, each with its rank (0 for a new value's first
    phrasing, 1 for its second, ...), each new value's first phrasing before any value's second:
    four foils of "looking angry" name four other expressions, not two phrasings of two."""
    rng.shuffle(candidates)
    seen: dict[str, int] = {}
    rank = []
    for candidate in candidates:
        value = repr(candidate.new)
        rank.append(seen.get(value, 0))
        seen[value] = rank[-1] + 1
    return sorted(zip(rank, candidates, strict=True), key=lambda pair: pair[0])


def hard_negatives(config: str | Mapping[str, Any] | None, seed: int = 0) -> FoilMaker | None:
    """The FoilMaker of a `data.hard_negatives` value: null (off), a source name, or a mapping
    with `source`, `per_caption`, `table`, `attributes` (a list of names or a mapping of
    names to weights), `fraction`, `form` and `wording`."""
    if config is None or config is False:
        return None
    if isinstance(config, str):
        return FoilMaker(source=config, seed=seed)
    if not isinstance(config, Mapping):
        raise ValueError(
            f"data.hard_negatives={config!r}; accepted: null (off), one of {', '.join(SOURCES)}, or a "
            f"mapping with keys {', '.join(_KEYS)}"
        )
    unknown = sorted(set(config) - set(_KEYS))
    if unknown:
        raise ValueError(f"data.hard_negatives has unknown key(s) {unknown}; accepted: {', '.join(_KEYS)}")
    table = config.get("table")
    return FoilMaker(
        source=config.get("source", "auto"),
        per_caption=config.get("per_caption", 1),
        table=None if table is None else str(table),
        seed=seed,
        attributes=config.get("attributes"),  # FoilMaker checks it and keeps it as a tuple
        fraction=config.get("fraction", 1.0),
        form=config.get("form", "caption"),
        wording=config.get("wording", "varied"),
    )
