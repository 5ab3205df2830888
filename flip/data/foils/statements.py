"""Statements: one attribute a caption states, said alone, against the same words for its other values.

A whole-caption foil costs the text tower a whole caption, and on FaceShapes a caption is about
29 tokens: eight foils per caption made the demo's step about three times as long. A statement
is the shortest caption the grammar can state the attribute in, a noun phrase with one phrase
after it ("a person who looks sad", about 7 tokens), and its group holds the same noun phrase
with a phrase of each other value of the attribute ("a person who looks happy", "a person
looking angry", ...). The image chooses its statement among its group (the choice term of the
clip and filip losses; SigLIP scores the statement as a positive pair and the others as
negatives), so each group teaches one attribute as a classifier over its values would, with
the grammar's phrasings as the classes' words.

Only what the caption says is stated: the groups are drawn among the record's `mentions`, and
a statement's phrase is one the grammar could have written for that face (its `when` met).
Few distinct statements exist (nouns x phrases), so a batch's repeat, and the model encodes
each distinct one once (`FlipModel.encode_foils`). On FaceShapes a batch of 128 holds about
300 distinct ones, nearly every one the grammar has. Plain wording (the grammar's first noun
and each value's first phrasing, which are the words the zero-shot prompts use) leaves 32,
whatever the number of groups, so more groups add no statement for the text tower to encode.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from flip.data.captions import CaptionGrammar
from flip.data.foils.grammar import Candidate, GrammarFoils

__all__ = ["group_size", "statement_groups"]

_VOWELS = "aeiou"


def group_size(grammar: CaptionGrammar, attributes: Sequence[str] | None = None) -> int:
    """Slots per statement group: the most values any of `attributes` (None: all) has."""
    names = [name for name in grammar.attributes if attributes is None or name in attributes]
    return max((len(grammar.attributes[name].entries) for name in names), default=2)


def _phrase(
    foils: GrammarFoils,
    record: Mapping[str, object],
    name: str,
    value: object,
    rng: random.Random,
    plain: bool = False,
) -> str | None:
    """A phrase the grammar could write after a noun for `name` = `value` on this face (with
    `plain`, the first such), or None."""
    phrases = foils.post_phrases(name, value, record)
    if not phrases:
        return None
    return phrases[0] if plain else rng.choice(phrases)


def _noun_phrase(noun: str, phrase: str) -> str:
    return f"{'an' if noun[:1].lower() in _VOWELS else 'a'} {noun} {phrase}"


def statement_groups(
    foils: GrammarFoils,
    record: Mapping[str, object],
    claimed: Sequence[tuple[str, object]],
    count: int,
    size: int,
    rng: random.Random,
    weights: Mapping[str, float] | None = None,
    plain: bool = False,
) -> list[Candidate | None]:
    """Up to `count` groups of `size` slots, flat: each led by the statement of a claimed
    (attribute, value), then the statements of its other values in random order, None where
    a group has fewer values than slots. The attributes are drawn without replacement, with
    probability proportional to `weights` (alike without); one with no phrase for its stated
    value, or for no other value, is passed over. `plain`: the grammar's first noun and each
    value's first phrasing, else any."""
    grammar = foils.grammar
    pool = [(name, value) for name, value in claimed if name in grammar.attributes]
    out: list[Candidate | None] = []
    while pool and len(out) < count * size:
        chance = [1.0 if weights is None else weights.get(name, 0.0) for name, _ in pool]
        if not any(chance):
            break
        name, value = pool.pop(rng.choices(range(len(pool)), weights=chance)[0])
        noun = grammar.nouns[0].text if plain else rng.choice(grammar.nouns).text
        stated = _phrase(foils, record, name, value, rng, plain)
        if stated is None:
            continue
        group = [Candidate(_noun_phrase(noun, stated), name, value, value)]
        others = [other for other in grammar.attributes[name].entries if other != value]
        rng.shuffle(others)
        for other in others:
            phrase = _phrase(foils, record, name, other, rng, plain)
            if phrase is not None:
                group.append(Candidate(_noun_phrase(noun, phrase), name, value, other))
        if len(group) > 1:
            out += group[:size] + [None] * (size - len(group[:size]))
    return out
