"""Foils from a caption grammar: its own phrases, for the same attribute with another value.

A caption written by `CaptionGrammar` states each attribute with one phrase of the grammar's
tables, in one of three slots: an adjective before the noun ("a *bearded* person"), a
modifier after it ("a person *with a beard*") or a predicate ("this person *has a beard*").
The foil puts a phrase of another value of the same attribute (present <-> absent, one hair
colour for another) in the same slot, so the sentence stays grammatical and every other
word stays. Phrases whose `when` the changed record does not meet are not used ("without
glasses" would also deny sunglasses). An attribute stated in a slot the other value has no
phrase for (an adjective that has no opposite adjective) gets no foil. With the record's
`mentions` (what the generator says the caption claims), only those statements are changed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flip.data.captions import CaptionGrammar
from flip.data.foils.phrases import Match, PhraseIndex, replace_span

__all__ = ["Candidate", "GrammarFoils"]

_SENTENCE_END = re.compile(r"[.!?](?:\s+|$)")


@dataclass(frozen=True)
class Candidate:
    """One foil: `text` is the caption with `attribute` changed from `old` to `new`."""

    text: str
    attribute: str
    old: object
    new: object


@dataclass(frozen=True)
class _Form:
    attribute: str
    value: object
    slot: str  # "adj", "post" or "pred"
    when: tuple[tuple[str, object], ...]
    text: str


def _forms(grammar: CaptionGrammar) -> list[_Form]:
    forms = []
    for name, attr in grammar.attributes.items():
        for value, entry in attr.entries.items():
            for phrase in entry.phrases:
                forms += [
                    _Form(name, value, "post", phrase.when, phrase.text),
                    _Form(name, value, "pred", phrase.when, phrase.predicate_form()),
                ]
            for phrase in entry.adjectives:
                forms += [
                    _Form(name, value, "adj", phrase.when, phrase.text),
                    _Form(name, value, "post", phrase.when, phrase.post_form()),
                    _Form(name, value, "pred", phrase.when, phrase.predicate_form()),
                ]
    return forms


class GrammarFoils:
    """The single-attribute foils of captions a `CaptionGrammar` wrote (see the module docstring)."""

    def __init__(self, grammar: CaptionGrammar, exclusive: Mapping[str, Sequence[str]] | None = None) -> None:
        self.grammar = grammar
        # name -> binary attributes of which a face has at most one (CelebA's hair colours): a
        # stated one can be swapped for another the record says is absent
        self.exclusive = {name: tuple(group) for name, group in (exclusive or {}).items()}
        self.forms: dict[str, list[_Form]] = {}  # by the words of the form
        self.by_value: dict[tuple[str, object, str], list[_Form]] = {}  # by (attribute, value, slot)
        for form in _forms(grammar):
            self.forms.setdefault(form.text.lower(), []).append(form)
            self.by_value.setdefault((form.attribute, form.value, form.slot), []).append(form)
        self.index = PhraseIndex(self.forms)
        self.nouns = PhraseIndex(noun.text for noun in grammar.nouns)
        # what the `when` of each (attribute, value)'s phrases after a noun reads, and their texts
        # by those values (`post_phrases`)
        self._post_reads = {
            (name, value): tuple(sorted({key for form in forms for key, _ in form.when}))
            for (name, value, slot), forms in self.by_value.items()
            if slot == "post"
        }
        self._post_phrases: dict[tuple, tuple[str, ...]] = {}

    def post_phrases(self, name: str, value: object, record: Mapping[str, object]) -> tuple[str, ...]:
        """The phrases after a noun the grammar could write for `name` = `value` on a face with
        `record`'s other attributes, in the grammar's order. Statements ask for the same few
        hundred sample after sample, so they are kept by the values their conditions read."""
        reads = self._post_reads.get((name, value), ())
        key = (name, value, *(value if read == name else record.get(read) for read in reads))
        found = self._post_phrases.get(key)
        if found is None:
            changed = {**record, name: value}
            forms = self.by_value.get((name, value, "post"), [])
            found = tuple(form.text for form in forms if self._applies(form.when, changed))
            self._post_phrases[key] = found
        return found

    def knows(self, attributes: Sequence[str]) -> int:
        """How many of `attributes` this grammar has phrases for."""
        return sum(name in self.grammar.attributes for name in attributes)

    def _record(self, record: Mapping[str, object] | None) -> dict[str, object] | None:
        if record is None:
            return None
        try:
            return self.grammar._normalize(record)
        except ValueError:
            return None

    def _before_noun(self, text: str, match: Match) -> bool:
        """Whether the match sits before the head noun of its sentence (an adjective's place)."""
        start = 0
        for end in _SENTENCE_END.finditer(text):
            if end.start() >= match.start:
                break
            start = end.end()
        return not self.nouns.find(text[start : match.start])

    def _slot_forms(self, text: str, match: Match) -> list[_Form]:
        forms = self.forms[match.phrase]
        slots = {form.slot for form in forms}
        if "adj" in slots and "post" in slots:  # a bare word that is both ("smiling")
            slot = "adj" if self._before_noun(text, match) else "post"
            forms = [form for form in forms if form.slot == slot]
        return forms

    @staticmethod
    def _applies(when: tuple[tuple[str, object], ...], record: Mapping[str, object] | None) -> bool:
        if not when:
            return True
        return record is not None and all(record.get(key) == value for key, value in when)

    def candidates(
        self,
        text: str,
        record: Mapping[str, object] | None = None,
        mentions: Sequence[Sequence[object]] | None = None,
    ) -> list[Candidate]:
        """Every single-attribute foil of `text`; `record` (the sample's attributes) checks the
        `when` of the new phrase, `mentions` ([[name, value], ...]) limit which statements change."""
        values = self._record(record)
        claimed = None if mentions is None else {(str(m[0]), m[1]) for m in mentions if len(m) == 2}
        out: list[Candidate] = []
        for match in self.index.find(text):
            forms = self._slot_forms(text, match)
            if claimed is not None:
                forms = [form for form in forms if (form.attribute, form.value) in claimed]
            for form in forms[:1]:  # one reading of the match: the attribute and value it states
                attr = self.grammar.attributes[form.attribute]
                changed = {**(values or {}), form.attribute: None}
                for new in attr.entries:
                    if new == form.value:
                        continue
                    changed[form.attribute] = new
                    seen = set()
                    for other in self.by_value.get((form.attribute, new, form.slot), []):
                        if other.text in seen or not self._applies(other.when, changed if values else None):
                            continue
                        seen.add(other.text)
                        foil = replace_span(text, match.start, match.end, other.text)
                        out.append(Candidate(foil, form.attribute, form.value, new))
                out += self._swaps(text, match, form, values)
        return out

    def _swaps(
        self, text: str, match: Match, form: _Form, values: Mapping[str, object] | None
    ) -> list[Candidate]:
        """Foils that state another member of an exclusive group instead ("with black hair" ->
        "with blond hair"): only with a record that says the new member is absent."""
        if form.value is not True or values is None:
            return []
        out = []
        for name, group in self.exclusive.items():
            if form.attribute not in group:
                continue
            for member in group:
                if member == form.attribute or values.get(member) is not False:
                    continue
                changed = {**values, form.attribute: False, member: True}
                seen = set()
                for other in self.by_value.get((member, True, form.slot), []):
                    if other.text not in seen and self._applies(other.when, changed):
                        seen.add(other.text)
                        foil = replace_span(text, match.start, match.end, other.text)
                        out.append(Candidate(foil, name, form.attribute, member))
        return out
