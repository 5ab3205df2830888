"""Data-driven template grammar that turns an attribute record into a varied caption.

A contrastive model only learns what captions say, and zero-shot prompts ask about presence
*and* absence ("... with a hat" vs "... without a hat"), so captions must mention absent
attributes negatively too, in many wordings and orders, or the text tower learns the
template instead of the attributes. Everything dataset-specific lives in a plain (YAML-able)
spec dict, so the same engine captions FaceShapes and CelebA.

Spec layout (every key except ``attributes`` is optional)::

    nouns: ["person", "face"]               # head nouns; an entry may be {"text": ..., "when": {...}}
    np_frames: ["a photo of {np}", "{np}"]  # noun-phrase sentences; {np} = "a smiling person with ..."
    clause_subjects: ["this person"]        # subjects of predicate sentences ("this person has a beard")
    one_sentence_prob: 0.55                 # else two sentences: a noun phrase (or clause), then a clause
    clause_first_prob: 0.2                  # first sentence is "This person ..." rather than a noun phrase
    adjective_prob: 0.4                     # use an adjective form ("bald person") when a value has one
    max_adjectives: 2                       # at most this many adjectives before the noun
    min_mentions: 2
    max_mentions: 7
    max_words: 36
    mention_prob: 0.7                       # default for present binary and categorical attributes
    negative_prob: 0.22                     # default for absent binary attributes
    attributes:
      eyeglasses:
        kind: binary
        positive: ["with eyeglasses", "wearing glasses"]
        negative: {phrases: ["without glasses"], adjectives: []}
      hair_color:
        kind: categorical
        mention_prob: 0.75
        values: {black: {phrases: ["with black hair"], adjectives: ["black-haired"]}}

A phrase is a post-nominal modifier ("with a beard", "wearing a hat", "who looks sad"); as a
string or as ``{"text": ..., "when": {attr: value}, "predicate": ...}``, where ``when`` limits
it to records with those values ("with short hair" only when not bald) and ``predicate``
overrides the automatic clause form ("with a beard" -> "has a beard").
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Caption", "CaptionGrammar", "CaptionSpecError"]

_TOP_KEYS = {
    "nouns": list,
    "np_frames": list,
    "clause_subjects": list,
    "one_sentence_prob": float,
    "clause_first_prob": float,
    "adjective_prob": float,
    "max_adjectives": int,
    "min_mentions": int,
    "max_mentions": int,
    "max_words": int,
    "mention_prob": float,
    "negative_prob": float,
    "attributes": dict,
}
_DEFAULTS: dict[str, Any] = {
    "nouns": ["person"],
    "np_frames": ["a photo of {np}", "{np}"],
    "clause_subjects": ["this person", "the person"],
    "one_sentence_prob": 0.55,
    "clause_first_prob": 0.2,
    "adjective_prob": 0.4,
    "max_adjectives": 2,
    "min_mentions": 2,
    "max_mentions": 7,
    "max_words": 36,
    "mention_prob": 0.7,
    "negative_prob": 0.22,
}
_KINDS = ("binary", "categorical")
_ATTR_KEYS = {
    "binary": {"kind", "positive", "negative", "mention_prob", "negative_prob"},
    "categorical": {"kind", "values", "mention_prob"},
}
_ENTRY_KEYS = {"phrases", "adjectives"}
_PHRASE_KEYS = {"text", "when", "predicate"}
# post-modifier -> predicate, first matching prefix wins; anything else gets "is " in front
_PREDICATE_RULES = (("who ", ""), ("with no ", "has no "), ("without ", "does not have "), ("with ", "has "))
_VOWELS = "aeiou"


class CaptionSpecError(ValueError):
    """A grammar spec that cannot work; the message names the key and what is accepted."""


@dataclass
class Caption:
    """A caption and what it claims, so tests and evaluations can check its semantics."""

    text: str
    mentions: list[tuple[str, object]] = field(default_factory=list)


@dataclass(frozen=True)
class _Phrase:
    text: str
    when: tuple[tuple[str, object], ...] = ()
    predicate: str | None = None
    adjective: bool = False

    def predicate_form(self) -> str:
        if self.predicate is not None:
            return self.predicate
        if self.adjective:
            return "is " + self.text
        for prefix, replacement in _PREDICATE_RULES:
            if self.text.startswith(prefix):
                return replacement + self.text[len(prefix) :]
        return "is " + self.text

    def post_form(self) -> str:
        return "who is " + self.text if self.adjective else self.text


@dataclass(frozen=True)
class _Entry:
    phrases: tuple[_Phrase, ...]
    adjectives: tuple[_Phrase, ...]


@dataclass(frozen=True)
class _Attribute:
    name: str
    kind: str
    mention_prob: float
    negative_prob: float
    entries: dict[object, _Entry]  # binary: True/False; categorical: the class values


@dataclass
class _Mention:
    attribute: str
    value: object
    phrase: _Phrase  # the form chosen for it (adjective or post-modifier)


def _fail(path: str, problem: str) -> CaptionSpecError:
    return CaptionSpecError(f"caption spec: {path} {problem}")


def _check_prob(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise _fail(path, f"is {value!r}; accepted: a probability between 0 and 1")
    return float(value)


def _check_when(when: object, path: str) -> tuple[tuple[str, object], ...]:
    if not isinstance(when, Mapping) or not all(isinstance(k, str) for k in when):
        raise _fail(path, f"is {when!r}; accepted: a mapping from attribute name to required value")
    return tuple(sorted(when.items()))


def _parse_phrase(item: object, path: str, adjective: bool) -> _Phrase:
    if isinstance(item, str):
        if not item.strip():
            raise _fail(path, "is an empty string; accepted: a non-empty phrase")
        return _Phrase(item.strip(), adjective=adjective)
    if isinstance(item, Mapping):
        unknown = set(item) - _PHRASE_KEYS
        if unknown:
            raise _fail(path, f"has unknown key(s) {sorted(unknown)}; accepted: {sorted(_PHRASE_KEYS)}")
        text = item.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _fail(f"{path}.text", f"is {text!r}; accepted: a non-empty string")
        predicate = item.get("predicate")
        if predicate is not None and (not isinstance(predicate, str) or not predicate.strip()):
            raise _fail(f"{path}.predicate", f"is {predicate!r}; accepted: a non-empty string")
        when = _check_when(item.get("when", {}), f"{path}.when")
        return _Phrase(text.strip(), when, predicate.strip() if predicate else None, adjective)
    raise _fail(path, f"is {item!r}; accepted: a string or a mapping with 'text' (and 'when', 'predicate')")


def _parse_list(items: object, path: str, adjective: bool) -> tuple[_Phrase, ...]:
    if isinstance(items, str) or not isinstance(items, Sequence):
        raise _fail(path, f"is {items!r}; accepted: a list of phrases")
    return tuple(_parse_phrase(item, f"{path}[{i}]", adjective) for i, item in enumerate(items))


def _parse_entry(entry: object, path: str) -> _Entry:
    """A value's wordings: a list of post-modifiers, or {phrases: [...], adjectives: [...]}."""
    if isinstance(entry, Mapping):
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise _fail(path, f"has unknown key(s) {sorted(unknown)}; accepted: {sorted(_ENTRY_KEYS)}")
        return _Entry(
            _parse_list(entry.get("phrases", []), f"{path}.phrases", adjective=False),
            _parse_list(entry.get("adjectives", []), f"{path}.adjectives", adjective=True),
        )
    return _Entry(_parse_list(entry, path, adjective=False), ())


def _parse_attribute(name: str, spec: object, defaults: Mapping[str, Any]) -> _Attribute:
    path = f"attributes.{name}"
    if not isinstance(spec, Mapping):
        raise _fail(path, f"is {spec!r}; accepted: a mapping with 'kind' and its phrase tables")
    kind = spec.get("kind")
    if kind not in _KINDS:
        raise _fail(f"{path}.kind", f"is {kind!r}; accepted: {', '.join(map(repr, _KINDS))}")
    unknown = set(spec) - _ATTR_KEYS[kind]
    if unknown:
        raise _fail(
            path, f"has unknown key(s) {sorted(unknown)}; accepted for {kind}: {sorted(_ATTR_KEYS[kind])}"
        )
    mention_prob = _check_prob(spec.get("mention_prob", defaults["mention_prob"]), f"{path}.mention_prob")
    negative_prob = _check_prob(spec.get("negative_prob", defaults["negative_prob"]), f"{path}.negative_prob")
    if kind == "binary":
        for key in ("positive", "negative"):
            if key not in spec:
                raise _fail(
                    path, f"lacks '{key}'; a binary attribute needs 'positive' and 'negative' phrases"
                )
        entries = {
            True: _parse_entry(spec["positive"], f"{path}.positive"),
            False: _parse_entry(spec["negative"], f"{path}.negative"),
        }
        if not entries[True].phrases + entries[True].adjectives:
            raise _fail(f"{path}.positive", "is empty; accepted: at least one phrase or adjective")
    else:
        values = spec.get("values")
        if not isinstance(values, Mapping) or not values:
            raise _fail(f"{path}.values", f"is {values!r}; accepted: a non-empty mapping value -> phrases")
        entries = {value: _parse_entry(entry, f"{path}.values.{value}") for value, entry in values.items()}
    return _Attribute(name, kind, mention_prob, negative_prob, entries)


def _parse_choices(items: object, path: str, placeholder: str | None = None) -> tuple[_Phrase, ...]:
    choices = _parse_list(items, path, adjective=False)
    if not choices:
        raise _fail(path, "is empty; accepted: a non-empty list")
    for i, choice in enumerate(choices):
        if placeholder is not None and choice.text.count(placeholder) != 1:
            raise _fail(
                f"{path}[{i}]", f"is {choice.text!r}; accepted: a frame with exactly one {placeholder}"
            )
    return choices


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


class CaptionGrammar:
    """Samples captions for attribute records from a spec (see the module docstring).

    The spec is validated here, so a typo in a YAML grammar fails when the dataset is built,
    with the key path and the accepted values in the message, not as odd captions later.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        if not isinstance(spec, Mapping):
            raise CaptionSpecError(f"caption spec: expected a mapping, got {type(spec).__name__}")
        unknown = set(spec) - set(_TOP_KEYS)
        if unknown:
            raise _fail("top level", f"has unknown key(s) {sorted(unknown)}; accepted: {sorted(_TOP_KEYS)}")
        if "attributes" not in spec:
            raise _fail("top level", "lacks 'attributes'; it maps attribute names to phrase tables")
        cfg = {**_DEFAULTS, **spec}
        for key in (
            "one_sentence_prob",
            "clause_first_prob",
            "adjective_prob",
            "mention_prob",
            "negative_prob",
        ):
            cfg[key] = _check_prob(cfg[key], key)
        for key in ("max_adjectives", "min_mentions", "max_mentions", "max_words"):
            if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 0:
                raise _fail(key, f"is {cfg[key]!r}; accepted: an integer >= 0")
        if cfg["min_mentions"] > cfg["max_mentions"]:
            raise _fail(
                "min_mentions", f"({cfg['min_mentions']}) exceeds max_mentions ({cfg['max_mentions']})"
            )
        self.config = cfg
        self.nouns = _parse_choices(cfg["nouns"], "nouns")
        self.np_frames = _parse_choices(cfg["np_frames"], "np_frames", "{np}")
        self.clause_subjects = _parse_choices(cfg["clause_subjects"], "clause_subjects")
        attributes = cfg["attributes"]
        if not isinstance(attributes, Mapping) or not attributes:
            raise _fail("attributes", "is empty or not a mapping; accepted: attribute name -> table")
        self.attributes = {str(n): _parse_attribute(str(n), a, cfg) for n, a in attributes.items()}

    # -- reading the record -------------------------------------------------------------------

    def _normalize(self, attributes: Mapping[str, object]) -> dict[str, object]:
        """Spec attributes as the engine compares them: binary -> bool, categorical -> table key."""
        values: dict[str, object] = dict(attributes)
        for name, attr in self.attributes.items():
            value = attributes.get(name)
            if value is None:
                values[name] = None
            elif attr.kind == "binary":
                if value in (True, 1):
                    values[name] = True
                elif value in (False, 0, -1):
                    values[name] = False
                else:
                    raise ValueError(
                        f"attribute {name!r} is binary; got {value!r}, accepted: bool, 0/1 or -1/1"
                    )
            elif value in attr.entries:
                values[name] = value
            elif str(value) in attr.entries:
                values[name] = str(value)
            else:
                raise ValueError(
                    f"attribute {name!r} has value {value!r}; accepted: {', '.join(map(repr, attr.entries))}"
                )
        return values

    @staticmethod
    def _applies(phrase: _Phrase, values: Mapping[str, object]) -> bool:
        return all(values.get(key) == required for key, required in phrase.when)

    def _options(self, attr: _Attribute, value: object, values: Mapping[str, object]) -> _Entry:
        entry = attr.entries[value]
        return _Entry(
            tuple(p for p in entry.phrases if self._applies(p, values)),
            tuple(p for p in entry.adjectives if self._applies(p, values)),
        )

    def surface_forms(self, attribute: str, value: object) -> list[str]:
        """Every string a caption can use to assert `attribute` = `value` (for checking captions)."""
        attr = self.attributes[attribute]
        key = bool(value) if attr.kind == "binary" else value
        entry = attr.entries.get(key, _Entry((), ()))
        forms: set[str] = set()
        for phrase in entry.phrases + entry.adjectives:
            forms.update({phrase.text, phrase.post_form(), phrase.predicate_form()})
        return sorted(forms)

    # -- sampling -----------------------------------------------------------------------------

    def _select(self, values: Mapping[str, object], rng: random.Random) -> list[_Mention]:
        cfg = self.config
        candidates: list[tuple[str, object, float, _Entry]] = []
        for name, attr in self.attributes.items():
            value = values.get(name)
            if value is None:
                continue
            prob = attr.negative_prob if attr.kind == "binary" and value is False else attr.mention_prob
            options = self._options(attr, value, values)
            if options.phrases or options.adjectives:
                candidates.append((name, value, prob, options))
        rng.shuffle(candidates)
        chosen = [rng.random() < prob for _, _, prob, _ in candidates]
        for i, (_, _, prob, _) in enumerate(candidates):  # top up to the minimum, in the shuffled order
            if sum(chosen) >= cfg["min_mentions"]:
                break
            chosen[i] = chosen[i] or prob > 0.0  # probability 0 means never
        mentions = []
        for (name, value, _, options), keep in zip(candidates, chosen, strict=True):
            if not keep:
                continue
            use_adjective = options.adjectives and (
                not options.phrases or rng.random() < cfg["adjective_prob"]
            )
            pool = options.adjectives if use_adjective else options.phrases
            mentions.append(_Mention(name, value, rng.choice(pool)))
        return mentions[: cfg["max_mentions"]]

    def _noun_phrase(self, mentions: Sequence[_Mention], noun: _Phrase) -> str:
        adjectives: list[str] = []
        posts: list[str] = []
        for mention in mentions:
            phrase = mention.phrase
            if phrase.adjective and len(adjectives) < self.config["max_adjectives"]:
                adjectives.append(phrase.text)
            else:
                posts.append(phrase.post_form())
        head = ", ".join(adjectives) + " " + noun.text if adjectives else noun.text
        article = "an" if head[:1].lower() in _VOWELS else "a"
        return f"{article} {head} {_join(posts)}".rstrip()

    @staticmethod
    def _clause(mentions: Sequence[_Mention], subject: _Phrase) -> str:
        return f"{subject.text} {_join([m.phrase.predicate_form() for m in mentions])}"

    def caption(self, attributes: Mapping[str, object], rng: random.Random) -> Caption:
        """A caption for one record; `rng` makes it reproducible per sample.

        Attributes the spec does not know are ignored (nuisance factors), missing or None
        ones are never mentioned, and a value outside the spec's table raises ValueError.
        """
        cfg = self.config
        values = self._normalize(attributes)
        mentions = self._select(values, rng)
        nouns = [n for n in self.nouns if self._applies(n, values)] or [_Phrase("person")]
        subjects = [s for s in self.clause_subjects if self._applies(s, values)] or [_Phrase("this person")]
        noun, subject = rng.choice(nouns), rng.choice(subjects)
        frame = rng.choice(self.np_frames)
        clause_first = rng.random() < cfg["clause_first_prob"]
        two_sentences = len(mentions) >= 2 and rng.random() >= cfg["one_sentence_prob"]
        split_fraction = rng.random()
        follow_subject = rng.choice(subjects)

        def render(ms: Sequence[_Mention]) -> tuple[str, list[_Phrase]]:
            split = (
                max(1, min(len(ms) - 1, round(split_fraction * (len(ms) - 1)))) if two_sentences else len(ms)
            )
            first, rest = ms[:split], ms[split:]
            if clause_first and first:
                sentences, heads = [self._clause(first, subject)], [subject]
            else:
                sentences, heads = [frame.text.replace("{np}", self._noun_phrase(first, noun))], [noun]
            if rest:
                sentences.append(self._clause(rest, follow_subject))
                heads.append(follow_subject)
            return " ".join(_capitalize(s) + "." for s in sentences), heads

        text, heads = render(mentions)
        while len(text.split()) > cfg["max_words"] and len(mentions) > cfg["min_mentions"]:
            mentions = mentions[:-1]
            text, heads = render(mentions)
        claimed: list[tuple[str, object]] = [(m.attribute, m.value) for m in mentions]
        for head in heads:  # "a man" asserts what its `when` requires
            claimed += [c for c in head.when if c not in claimed]
        return Caption(text, claimed)
