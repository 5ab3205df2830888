"""The caption engine: spec validation, sampling rules, and the FaceShapes grammar's semantics."""

from __future__ import annotations

import collections
import copy
import random
import re

import pytest

from flip.data.captions import Caption, CaptionGrammar, CaptionSpecError
from flip.data.faceshapes.attributes import BINARY_ATTRIBUTES, MULTICLASS_ATTRIBUTES, sample_attributes
from flip.data.faceshapes.grammar import FACESHAPES_GRAMMAR

TOY_SPEC = {
    "nouns": ["person", {"text": "man", "when": {"male": True}}, {"text": "woman", "when": {"male": False}}],
    "np_frames": ["a photo of {np}", "{np}"],
    "clause_subjects": ["this person"],
    "attributes": {
        "umbrella": {
            "kind": "binary",
            "positive": ["holding an umbrella", "with an umbrella"],
            "negative": ["without an umbrella"],
        },
        "beard": {
            "kind": "binary",
            "positive": {"phrases": ["with a beard"], "adjectives": ["bearded"]},
            "negative": {
                "phrases": ["without a beard"],
                "adjectives": [{"text": "clean-shaven", "when": {"male": True}}],
            },
        },
        "male": {
            "kind": "binary",
            "mention_prob": 0.0,
            "negative_prob": 0.0,
            "positive": ["who is male"],
            "negative": [],
        },
        "color": {
            "kind": "categorical",
            "values": {"red": ["in red"], "blue": {"phrases": ["in blue"], "adjectives": ["blue-clad"]}},
        },
    },
}


def _forms(grammar: CaptionGrammar, attribute: str, value: object) -> list[str]:
    return grammar.surface_forms(attribute, value)


def _pattern(phrases: list[str]) -> re.Pattern[str]:
    """Whole-phrase matcher (longest first), so "with glasses" does not match "with sunglasses"."""
    alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return re.compile(r"(?<![\w-])(?:" + alternatives + r")(?![\w-])", flags=re.IGNORECASE)


def _contains(text: str, phrase: str) -> bool:
    return _pattern([phrase]).search(text) is not None


# -- spec validation -----------------------------------------------------------------------------


def _broken(path: list, value: object) -> dict:
    spec = copy.deepcopy(TOY_SPEC)
    node = spec
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (_broken(["nounz"], ["x"]), r"unknown key\(s\) \['nounz'\]; accepted: .*'nouns'"),
        (_broken(["attributes"], KeyError), "lacks 'attributes'"),
        (
            _broken(["attributes", "umbrella", "kind"], "bool"),
            r"attributes\.umbrella\.kind is 'bool'; accepted: 'binary'",
        ),
        (
            _broken(["attributes", "umbrella", "mention_prob"], 1.5),
            r"attributes\.umbrella\.mention_prob is 1\.5",
        ),
        (_broken(["attributes", "umbrella", "negative"], KeyError), r"attributes\.umbrella lacks 'negative'"),
        (_broken(["attributes", "umbrella", "positive"], []), r"attributes\.umbrella\.positive is empty"),
        (
            _broken(["attributes", "umbrella", "values"], {}),
            r"unknown key\(s\) \['values'\]; accepted for binary",
        ),
        (_broken(["attributes", "color", "values"], {}), r"attributes\.color\.values is \{\}"),
        (_broken(["attributes", "color", "values", "red"], [3]), r"attributes\.color\.values\.red\[0\] is 3"),
        (
            _broken(["attributes", "color", "values", "red"], {"phrase": ["x"]}),
            r"accepted: \['adjectives', 'phrases'\]",
        ),
        (
            _broken(["attributes", "umbrella", "positive"], [{"txt": "x"}]),
            r"umbrella\.positive\[0\] has unknown key",
        ),
        (
            _broken(["attributes", "umbrella", "positive"], [{"text": "x", "when": 3}]),
            r"positive\[0\]\.when is 3",
        ),
        (_broken(["np_frames"], ["a photo of a person"]), r"np_frames\[0\] .*exactly one \{np\}"),
        (_broken(["nouns"], []), "nouns is empty"),
        (_broken(["min_mentions"], 9), r"min_mentions \(9\) exceeds max_mentions \(7\)"),
        (_broken(["max_words"], -1), "max_words is -1; accepted: an integer >= 0"),
        (_broken(["one_sentence_prob"], "often"), "one_sentence_prob is 'often'"),
    ],
)
def test_spec_errors_name_the_key_and_what_is_accepted(spec: dict, expected: str) -> None:
    with pytest.raises(CaptionSpecError, match=expected):
        CaptionGrammar(spec)


def test_spec_must_be_a_mapping() -> None:
    with pytest.raises(CaptionSpecError, match="expected a mapping"):
        CaptionGrammar(["attributes"])  # type: ignore[arg-type]


def test_bad_record_values_are_rejected_with_the_accepted_ones() -> None:
    grammar = CaptionGrammar(TOY_SPEC)
    with pytest.raises(ValueError, match=r"'color' has value 'green'; accepted: 'red', 'blue'"):
        grammar.caption({"color": "green"}, random.Random(0))
    with pytest.raises(ValueError, match="'umbrella' is binary; got 'yes'"):
        grammar.caption({"umbrella": "yes"}, random.Random(0))


# -- sampling rules -------------------------------------------------------------------------------


def test_caption_is_reproducible_from_the_rng() -> None:
    grammar = CaptionGrammar(TOY_SPEC)
    record = {"umbrella": True, "beard": False, "male": True, "color": "blue"}
    first = [grammar.caption(record, random.Random(i)) for i in range(20)]
    again = [grammar.caption(record, random.Random(i)) for i in range(20)]
    assert first == again
    assert all(isinstance(c, Caption) for c in first)
    assert len({c.text for c in first}) > 5


def test_none_and_missing_values_are_never_mentioned() -> None:
    grammar = CaptionGrammar(TOY_SPEC)
    for seed in range(200):
        caption = grammar.caption({"umbrella": True, "beard": None, "color": None}, random.Random(seed))
        assert {name for name, _ in caption.mentions} <= {"umbrella"}
        assert "beard" not in caption.text and "shaven" not in caption.text
        assert not any(word in caption.text for word in ("red", "blue"))


def test_at_least_min_mentions_and_binary_values_accept_ints() -> None:
    grammar = CaptionGrammar(TOY_SPEC)
    for seed in range(300):
        caption = grammar.caption(
            {"umbrella": 0, "beard": -1, "male": 1, "color": "red"}, random.Random(seed)
        )
        attrs = [name for name, _ in caption.mentions if name != "male"]
        assert len(attrs) >= 2
        assert ("umbrella", False) in caption.mentions or ("beard", False) in caption.mentions


def test_when_conditions_limit_phrases_and_subject_nouns_record_what_they_assert() -> None:
    grammar = CaptionGrammar(TOY_SPEC)
    woman_texts, man_seen = [], False
    for seed in range(400):
        woman = grammar.caption({"beard": False, "male": False, "umbrella": True}, random.Random(seed))
        woman_texts.append(woman.text)
        assert "clean-shaven" not in woman.text
        assert " man " not in f" {woman.text} "
        if "woman" in woman.text:
            assert ("male", False) in woman.mentions
        man = grammar.caption({"beard": False, "male": True, "umbrella": True}, random.Random(seed))
        man_seen |= "clean-shaven" in man.text
    assert man_seen
    assert any("woman" in t for t in woman_texts) and any("person" in t for t in woman_texts)


def test_predicate_forms_are_derived_from_phrases() -> None:
    spec = {**copy.deepcopy(TOY_SPEC), "clause_first_prob": 1.0, "one_sentence_prob": 1.0}
    grammar = CaptionGrammar(spec)
    record = {"umbrella": True, "beard": True, "color": "blue", "male": True}
    texts = {grammar.caption(record, random.Random(seed)).text for seed in range(200)}
    assert all(t.startswith("This person ") for t in texts)
    joined = " ".join(texts)
    for phrase in ("has a beard", "is bearded", "is holding an umbrella", "has an umbrella", "is in blue"):
        assert phrase in joined


def test_word_limit_drops_mentions_but_keeps_the_minimum() -> None:
    long_phrase = "with " + " ".join(["very"] * 8) + " long hair"
    spec = {
        "max_words": 20,
        "min_mentions": 1,
        "attributes": {
            f"a{i}": {"kind": "binary", "mention_prob": 1.0, "positive": [long_phrase], "negative": []}
            for i in range(6)
        },
    }
    grammar = CaptionGrammar(spec)
    for seed in range(50):
        caption = grammar.caption({f"a{i}": True for i in range(6)}, random.Random(seed))
        assert len(caption.text.split()) <= 20
        assert len(caption.mentions) == 1


# -- the FaceShapes grammar -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> list[tuple[dict, Caption]]:
    grammar = CaptionGrammar(FACESHAPES_GRAMMAR)
    rng = random.Random(1234)
    out = []
    for _ in range(3000):
        record = sample_attributes(rng)
        out.append((record, grammar.caption(record, rng)))
    return out


def test_every_mention_is_true_and_stated_in_the_text(corpus: list[tuple[dict, Caption]]) -> None:
    grammar = CaptionGrammar(FACESHAPES_GRAMMAR)
    for record, caption in corpus:
        assert len(caption.mentions) >= 2
        assert len({name for name, _ in caption.mentions}) == len(caption.mentions)
        for name, value in caption.mentions:
            assert record[name] == value, (caption.text, name, value)
            assert any(_contains(caption.text, form) for form in _forms(grammar, name, value)), (
                caption.text,
                name,
            )


def test_no_positive_phrase_for_an_absent_attribute(corpus: list[tuple[dict, Caption]]) -> None:
    grammar = CaptionGrammar(FACESHAPES_GRAMMAR)
    negatives = [form for name in BINARY_ATTRIBUTES for form in _forms(grammar, name, False)]
    positives = {form for name in BINARY_ATTRIBUTES for form in _forms(grammar, name, True)}
    assert not positives & set(negatives)  # else stripping negatives below would hide a bug
    strip = _pattern(negatives)  # "not wearing earrings" contains "wearing earrings"
    claims = {(name, True): _pattern(_forms(grammar, name, True)) for name in BINARY_ATTRIBUTES}
    for name, classes in MULTICLASS_ATTRIBUTES.items():
        claims.update({(name, value): _pattern(_forms(grammar, name, value)) for value in classes})
    for record, caption in corpus:
        text = strip.sub(" # ", caption.text)
        for (name, value), pattern in claims.items():
            if record[name] != value:
                assert not pattern.search(text), (caption.text, name, value)


def test_bald_faces_get_no_hair_colour_or_short_hair(corpus: list[tuple[dict, Caption]]) -> None:
    bald = [c for r, c in corpus if r["bald"]]
    assert len(bald) > 500
    for caption in bald:
        assert not any(name in ("hair_color", "bangs", "long_hair") for name, _ in caption.mentions), (
            caption.text
        )
        assert "short hair" not in caption.text and "-haired" not in caption.text


def test_ambiguous_negatives_are_avoided(corpus: list[tuple[dict, Caption]]) -> None:
    """ "Without glasses" would deny sunglasses too; "clean-shaven" would deny a mustache."""
    for record, caption in corpus:
        if record["sunglasses"]:
            assert not _pattern(["without glasses", "not wearing glasses", "with no glasses"]).search(
                caption.text
            )
        if record["mustache"]:
            assert "clean-shaven" not in caption.text


def test_lengths_and_variety(corpus: list[tuple[dict, Caption]]) -> None:
    words = [len(c.text.split()) for _, c in corpus]
    assert max(words) <= 36
    assert sum(8 <= n <= 30 for n in words) / len(words) > 0.85
    texts = [c.text for _, c in corpus]
    assert len(set(texts)) > 0.97 * len(texts)
    openings = collections.Counter(" ".join(t.split()[:3]) for t in texts)
    assert len(openings) >= 15
    assert any(t.startswith("This person") for t in texts) and any(t.startswith("A face") for t in texts)
    assert any(t.startswith("A close-up photo of") for t in texts)
    two_sentences = sum(t.count(".") == 2 for t in texts) / len(texts)
    assert 0.2 < two_sentences < 0.7
    # order is shuffled: two attributes appear in both orders
    pairs = collections.Counter()
    for _, caption in corpus:
        names = [n for n, _ in caption.mentions]
        if "hat" in names and "expression" in names:
            pairs[names.index("hat") < names.index("expression")] += 1
    assert pairs[True] > 20 and pairs[False] > 20


def test_mention_rates_teach_presence_and_absence(corpus: list[tuple[dict, Caption]]) -> None:
    for name in BINARY_ATTRIBUTES:
        present = [c for r, c in corpus if r[name]]
        absent = [c for r, c in corpus if not r[name]]
        said_present = sum((name, True) in c.mentions for c in present) / len(present)
        said_absent = sum((name, False) in c.mentions for c in absent) / len(absent)
        assert 0.55 < said_present < 0.97, (name, said_present)
        assert 0.04 < said_absent < 0.4, (name, said_absent)
    for name in MULTICLASS_ATTRIBUTES:
        known = [c for r, c in corpus if r[name] is not None]
        rate = sum(any(n == name for n, _ in c.mentions) for c in known) / len(known)
        assert 0.6 < rate < 0.95, (name, rate)


def test_small_attribute_words_are_evidence_of_the_attribute(corpus: list[tuple[dict, Caption]]) -> None:
    """A caption naming a small attribute, either way, mostly describes a face that has it: the
    word alone then carries the signal a young text tower can learn from (see grammar.py)."""

    def share_with_attribute(name: str) -> float:
        named = [r[name] for r, c in corpus if any(n == name for n, _ in c.mentions)]
        return sum(named) / len(named)

    for name in ("eyeglasses", "mustache", "earrings", "bangs", "lipstick", "rosy_cheeks"):
        assert share_with_attribute(name) > 0.8, (name, share_with_attribute(name))
    for name in ("hat", "beard"):  # the obvious ones keep the default rates
        assert share_with_attribute(name) < 0.7, (name, share_with_attribute(name))


def test_prompt_phrasings_occur_in_training_captions(corpus: list[tuple[dict, Caption]]) -> None:
    """Zero-shot prompts must be phrased the way training captions are."""
    text = " ".join(c.text for _, c in corpus).lower()
    for phrase in (
        "with eyeglasses",
        "without eyeglasses",
        "wearing sunglasses",
        "without sunglasses",
        "wearing a hat",
        "with no hat",
        "without a hat",
        "with a beard",
        "without a beard",
        "with a mustache",
        "without a mustache",
        "wearing earrings",
        "not wearing earrings",
        "with bangs",
        "without bangs",
        "with long hair",
        "with short hair",
        "who is bald",
        "with a bald head",
        "who is not bald",
        "wearing lipstick",
        "without lipstick",
        "with rosy cheeks",
        "without rosy cheeks",
        "with black hair",
        "with blond hair",
        "with gray hair",
        "with red hair",
        "with brown hair",
        "who is smiling",
        "who looks sad",
        "who looks surprised",
        "who looks angry",
        "with a neutral expression",
    ):
        assert phrase in text, phrase
