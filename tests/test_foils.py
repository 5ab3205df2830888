"""Attribute foils (flip.data.foils): one attribute changed, by the grammars and by the table."""

from __future__ import annotations

import pickle
import random
import re
from collections import Counter

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from flip.data.captions import CaptionGrammar
from flip.data.celeba_grammar import CELEBA_GRAMMAR
from flip.data.faceshapes import FACESHAPES_GRAMMAR, sample_attributes
from flip.data.foils import DEFAULT_TABLE, FoilMaker, FoilTable, hard_negatives, load_table
from flip.data.foils.grammar import Candidate
from flip.data.transform import SampleTransform

from .helpers import compose_train_config
from .helpers.gradients import assert_gradients_close


def claims(grammar: CaptionGrammar, text: str) -> set[tuple[str, object]]:
    """What a caption states, read with the grammar's own surface forms (longest first, each
    word read once): an independent check of what a foil changed."""
    forms = []
    for name, attr in grammar.attributes.items():
        for value in attr.entries:
            forms += [(form.lower(), name, value) for form in grammar.surface_forms(name, value)]
    found, rest = set(), text.lower()
    for form, name, value in sorted(forms, key=lambda f: -len(f[0])):
        pattern = rf"(?<![\w-]){re.escape(form)}(?![\w-])"
        if re.search(pattern, rest):
            found.add((name, value))
            rest = re.sub(pattern, "#", rest)
    return found


def faceshapes_record(index: int) -> tuple[dict, str]:
    grammar = CaptionGrammar(FACESHAPES_GRAMMAR)
    record = sample_attributes(random.Random(f"r{index}"))
    caption = grammar.caption(record, random.Random(f"c{index}"))
    return {**record, "mentions": [[n, v] for n, v in caption.mentions]}, caption.text


def celeba_record(index: int) -> tuple[dict, str]:
    grammar = CaptionGrammar(CELEBA_GRAMMAR)
    rng = random.Random(f"a{index}")
    record = {name: rng.random() < 0.4 for name in grammar.attributes}
    caption = grammar.caption(record, random.Random(f"c{index}"))
    return {**record, "mentions": [[n, v] for n, v in caption.mentions]}, caption.text


@pytest.mark.parametrize(
    ("spec", "make"), [(FACESHAPES_GRAMMAR, faceshapes_record), (CELEBA_GRAMMAR, celeba_record)]
)
def test_grammar_foils_change_exactly_one_attribute_against_the_record(spec, make):
    grammar, maker = CaptionGrammar(spec), FoilMaker(source="grammar")
    foiled = changed_attributes = swaps = 0
    for index in range(60):
        record, text = make(index)
        stated = claims(grammar, text)
        # CelebA says Male through the noun ("a man"), which no foil changes
        mentioned = {(n, v) for n, v in record["mentions"] if n in grammar.attributes and n != "Male"}
        assert mentioned <= stated  # the reader sees what the caption says
        candidates = maker.candidates(text, record)
        foiled += bool(candidates)
        for foil in candidates:
            assert foil.text != text and foil.old != foil.new
            after = claims(grammar, foil.text)
            if foil.attribute == "hair_color" and spec is CELEBA_GRAMMAR:  # one colour for another
                assert after == (stated - {(foil.old, True)}) | {(foil.new, True)}, (text, foil)
                assert record[foil.old] is True and record[foil.new] is False
                swaps += 1
                continue
            # the changed statement, and nothing else
            assert after == (stated - {(foil.attribute, foil.old)}) | {(foil.attribute, foil.new)}, (
                text,
                foil,
            )
            assert (foil.attribute, foil.old) in mentioned and record[foil.attribute] == foil.old
            changed_attributes += 1
    assert foiled >= 55 and changed_attributes > 200  # nearly every caption can be foiled
    assert swaps > 0 or spec is FACESHAPES_GRAMMAR


def test_grammar_foils_keep_the_sentence_around_the_changed_phrase():
    maker = FoilMaker(source="grammar")
    record = {
        "expression": "angry",
        "mustache": True,
        "mentions": [["expression", "angry"], ["mustache", True]],
    }
    foils = {c.text for c in maker.candidates("An angry person with a mustache.", record)}
    assert "A happy person with a mustache." in foils  # the article agrees with the new adjective
    assert "An angry person without a mustache." in foils
    assert "An angry person who looks sad with a mustache." not in foils  # an adjective stays an adjective
    # "without glasses" would deny the sunglasses too: not offered when they are worn
    worn = {"eyeglasses": True, "sunglasses": True, "mentions": [["eyeglasses", True]]}
    texts = {c.text for c in maker.candidates("A person with eyeglasses.", worn)}
    assert "A person without eyeglasses." in texts and "A person without glasses." not in texts


def test_the_table_matches_whole_words_and_keeps_the_case(tmp_path):
    table = FoilTable(
        {
            "eyeglasses": {"with glasses": ["without glasses"], "glasses": ["no glasses"]},
            "bald": {"bald": ["curly"]},
            "expression": {"angry": ["happy"]},
        }
    )
    texts = {c.text for c in table.candidates("With glasses, sunglasses and a bald-headed look")}
    assert texts == {"Without glasses, sunglasses and a bald-headed look"}  # not inside other words
    assert [c.text for c in table.candidates("WITH GLASSES")] == ["WITHOUT GLASSES"]
    assert [c.text for c in table.candidates("an angry, bald man")] == [
        "a happy, bald man",
        "an angry, curly man",
    ]
    assert [c.attribute for c in table.candidates("an angry, bald man")] == ["expression", "bald"]
    assert table.candidates("a man in a hat") == []
    # the table file: a phrase may stand for one attribute only; errors name the file and entry
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"a": {"x": ["y"]}, "b": {"X": ["z"]}}))
    with pytest.raises(ValueError, match=r"t\.yaml.*listed twice"):
        load_table(path)
    path.write_text(yaml.safe_dump({"a": {"x": []}}))
    with pytest.raises(ValueError, match="non-empty list"):
        load_table(path)


def test_the_default_table_loads_and_foils_free_form_captions():
    table = load_table(DEFAULT_TABLE)
    texts = {c.text for c in table.candidates("A smiling woman with black hair, wearing glasses.")}
    assert "A frowning woman with black hair, wearing glasses." in texts
    assert "A smiling man with black hair, wearing glasses." in texts
    assert "A smiling woman with blond hair, wearing glasses." in texts
    assert "A smiling woman with black hair, not wearing glasses." in texts


def test_hard_negatives_config_and_its_errors():
    assert hard_negatives(None) is None
    maker = hard_negatives({"source": "table", "per_caption": 2}, seed=3)
    assert (maker.source, maker.per_caption, maker.seed, maker.needs_json) == ("table", 2, 3, False)
    assert hard_negatives("auto").needs_json
    with pytest.raises(ValueError, match="accepted: auto, grammar, table"):
        hard_negatives("grammer")
    with pytest.raises(ValueError, match="unknown key"):
        hard_negatives({"sources": "auto"})
    with pytest.raises(ValueError, match="per_caption"):
        hard_negatives({"per_caption": 0})
    with pytest.raises(FileNotFoundError, match="no foil table"):
        hard_negatives({"source": "table", "table": "/nonexistent.yaml"})


def test_foils_of_chosen_attributes_name_every_other_value_before_repeating_one():
    grammar = CaptionGrammar(FACESHAPES_GRAMMAR)
    expressions = set(grammar.attributes["expression"].entries)
    maker = hard_negatives({"source": "grammar", "per_caption": 4, "attributes": ["expression"]})
    seen = 0
    for index in range(40):
        record, text = faceshapes_record(index)
        foils = maker({"text": text, "json": record, "__seed__": index})
        if "expression" not in {name for name, _ in record["mentions"]}:
            assert foils == []  # nothing to change among the chosen attributes: masked out
            continue
        seen += 1
        assert {f.attribute for f in foils} == {"expression"}
        # the four other expressions, each once, each foil stating exactly that one change
        assert sorted(f.new for f in foils) == sorted(expressions - {record["expression"]})
        for foil in foils:
            assert claims(grammar, foil.text) - claims(grammar, text) == {("expression", foil.new)}
    assert seen >= 20
    with pytest.raises(ValueError, match="attributes"):
        hard_negatives({"attributes": []})
    with pytest.raises(ValueError, match="attributes"):
        hard_negatives({"attributes": "expression"})


def test_every_attributes_new_values_come_before_a_second_phrasing_of_any():
    # four other expressions and the one other value of each binary attribute, never a second
    # phrasing of "without a beard" while an expression is left unnamed
    chosen = ["expression", "beard", "mustache", "bangs"]
    maker = hard_negatives({"source": "grammar", "per_caption": 8, "attributes": chosen})
    seen = 0
    for index in range(200):
        record, text = faceshapes_record(index)
        stated = {name for name, _ in record["mentions"]} & set(chosen)
        if "expression" not in stated or len(stated) < 2:
            continue
        seen += 1
        foils = maker({"text": text, "json": record, "__seed__": index})
        # the other values this caption's phrases can be changed to
        values = {(c.attribute, repr(c.new)) for c in maker.candidates(text, record) if c.attribute in chosen}
        counts = Counter(name for name, _ in values)
        assert counts["expression"] == 4 and set(counts.values()) <= {1, 4}
        first = foils[: len(values)]
        assert {(f.attribute, repr(f.new)) for f in first} == values  # each named once, first
        assert len(foils) == 8  # second phrasings fill the rest
    assert seen >= 20


def test_attribute_weights_set_how_often_each_attribute_is_foiled():
    # pick directly among one candidate per attribute: the first foil of each caption is drawn
    # with probability weight / total weight, the second from the rest in the same proportion
    weights = {"expression": 4.0, "beard": 1.0, "mustache": 3.0}
    maker = hard_negatives({"per_caption": 1, "attributes": {**weights, "hat": 2}})
    assert maker.attributes == ("expression", "beard", "mustache", "hat")
    candidates = [Candidate(f"foil of {name}", name, True, False) for name in [*weights, "bangs"]]
    draws = 4000
    firsts = Counter(maker.pick(candidates, random.Random(i))[0].attribute for i in range(draws))
    assert set(firsts) == set(weights)  # bangs is not listed; hat is, but the caption has none
    total = sum(weights.values())
    for name, weight in weights.items():
        p = weight / total
        assert abs(firsts[name] / draws - p) < 4 * (p * (1 - p) / draws) ** 0.5, (name, firsts)
    # two foils: the heaviest is nearly always among them, where a list would give it 2/3
    pairs = hard_negatives({"per_caption": 2, "attributes": {"expression": 100, "beard": 1, "mustache": 1}})
    picked = [{f.attribute for f in pairs.pick(candidates, random.Random(i))} for i in range(500)]
    assert sum("expression" in p for p in picked) >= 495
    assert 200 <= sum("beard" in p for p in picked) <= 300  # the second slot is shared evenly
    uniform = hard_negatives({"per_caption": 2, "attributes": ["expression", "beard", "mustache"]})
    shares = [{f.attribute for f in uniform.pick(candidates, random.Random(i))} for i in range(500)]
    assert 290 <= sum("expression" in p for p in shares) <= 375  # 2/3 of 500, +-4 sd


@pytest.mark.parametrize("weight", [0, -1.0, True, "4", float("nan"), float("inf")])
def test_an_attribute_weight_that_is_not_a_positive_number_is_refused(weight):
    with pytest.raises(ValueError, match=r"attributes\.beard=.*accepted: a weight above 0"):
        hard_negatives({"attributes": {"expression": 2, "beard": weight}})


def test_foils_are_seeded_per_sample_and_differ_by_attribute():
    maker = FoilMaker(source="auto", per_caption=3)
    record, text = faceshapes_record(3)
    sample = {"text": text, "json": record, "__seed__": 12345, "__key__": "k"}
    first = maker(sample)
    assert len(first) == 3 and len({f.attribute for f in first}) == min(3, len(record["mentions"]))
    assert pickle.loads(pickle.dumps(maker))(sample) == first  # the same in a loader worker
    others = {tuple(f.text for f in maker({**sample, "__seed__": seed})) for seed in range(20)}
    assert len(others) > 1  # another place in the stream draws other foils
    # auto falls back to the table for a sample no grammar wrote
    free = maker({"text": "a man with glasses", "json": {"colour": "red"}, "__seed__": 1})
    assert {f.text for f in free} == {"a woman with glasses", "a man without glasses"}
    assert FoilMaker(source="grammar")({"text": "a man with glasses", "__seed__": 1}) == []


def test_a_batch_carries_foil_tokens_and_the_mask_of_captions_that_got_one(tiny_model):
    maker = FoilMaker(source="table", per_caption=2)
    transform = SampleTransform(tiny_model.preprocess_train, tiny_model.tokenizer, foils=maker)
    from PIL import Image

    image = Image.new("RGB", (32, 32), "red")
    texts = ["a man with glasses", "a red square", "a bald head"]
    prepared = [transform.prepare({"image": image, "text": t, "__seed__": i}) for i, t in enumerate(texts)]
    images, tokens, foil_tokens, mask = transform.collate(prepared)
    assert images.shape[0] == 3
    assert tokens.shape == (3, tokens.shape[1]) and foil_tokens.shape == (3, 2, tokens.shape[1])
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    assert torch.equal(tokens, tiny_model.tokenizer(texts))
    expected = [f.text for f in maker({"text": texts[0], "__seed__": 0})]
    assert torch.equal(foil_tokens[0], tiny_model.tokenizer(expected))
    assert torch.equal(foil_tokens[1], tiny_model.tokenizer(["", ""]))


def test_a_fraction_of_the_captions_get_foils_drawn_by_their_seed():
    record, text = faceshapes_record(5)
    everyone = FoilMaker(source="grammar", per_caption=2)
    half = hard_negatives({"source": "grammar", "per_caption": 2, "fraction": 0.5})
    samples = [{"text": text, "json": record, "__seed__": seed} for seed in range(2000)]
    assert all(len(everyone(s)) == 2 for s in samples)
    picked = [half(s) for s in samples]
    share = sum(bool(p) for p in picked) / len(samples)
    assert abs(share - 0.5) < 4 * (0.25 / len(samples)) ** 0.5
    assert all(len(p) in (0, 2) for p in picked)  # a caption gets all its foils or none
    assert [half(s) for s in samples[:50]] == picked[:50]  # the same draw for the same seed
    assert pickle.loads(pickle.dumps(half))(samples[7]) == picked[7]


@pytest.mark.parametrize("fraction", [0, 0.0, -0.5, 1.5, True, "half", float("nan")])
def test_a_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ValueError, match=r"fraction=.*accepted: a number in \(0, 1\]"):
        hard_negatives({"fraction": fraction})


def test_only_the_foils_that_exist_are_encoded_with_the_same_features_and_gradients(tiny_model):
    batch, count = 3, 4
    captions = [faceshapes_record(i)[1] for i in range(batch * count)]
    foils = tiny_model.tokenizer(captions).view(batch, count, -1)
    mask = torch.tensor([[True, True, False, False], [False] * 4, [True, False, True, True]])
    for return_tokens in (False, True):
        tiny_model.zero_grad()
        dense = tiny_model.encode_foils(foils, return_tokens)
        dense_grads = _foil_grads(tiny_model, dense, mask)
        tiny_model.zero_grad()
        sparse = tiny_model.encode_foils(foils, return_tokens, mask)
        sparse_grads = _foil_grads(tiny_model, sparse, mask)
        assert set(sparse) == set(dense)
        for name, value in sparse.items():
            assert value.shape == dense[name].shape, name
            torch.testing.assert_close(value[mask], dense[name][mask], atol=1e-5, rtol=1e-5)
            assert not value[~mask].any(), name  # a missing foil is zeros (False), never encoded
        assert_gradients_close(sparse_grads, dense_grads)
    counted = []
    handle = tiny_model.clip.token_embedding.register_forward_hook(
        lambda _m, args, _o: counted.append(args[0].shape[0])
    )
    try:
        tiny_model.encode_foils(foils, False, mask)
        none = tiny_model.encode_foils(foils, False, torch.zeros_like(mask))
    finally:
        handle.remove()
    assert counted == [int(mask.sum()), 1]  # a batch without foils still has the outputs' shapes
    assert none["foil_text_features"].shape == (batch, count, dense["foil_text_features"].shape[-1])


def _foil_grads(model, encoded: dict, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the text tower from a loss on the foils that exist only."""
    loss = sum((value[mask].float() * torch.linspace(-1, 1, value[mask].numel()).view_as(value[mask])).sum()
               for value in encoded.values() if value.is_floating_point())  # fmt: skip
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_demo_foils_experiment_is_the_demo_with_the_documented_foil_recipe(tmp_path):
    # experiment=demo_foils stands for the override line docs/training.md measured on the demo
    # before it took statements (loss=clip_filip)
    recipe = [
        "loss=clip_filip",
        "data.hard_negatives={source:grammar,per_caption:8,attributes:[expression,beard,mustache,bangs,long_hair],fraction:1.0}",
        *(f"loss.terms.{t}.loss.foil_choice_{k}={v}" for t in ("clip", "filip")
          for k, v in (("weight", 3.0), ("start_step", 300), ("ramp_steps", 300))),
    ]  # fmt: skip
    experiment = compose_train_config(tmp_path, ["experiment=demo_foils"], base=[])
    overridden = compose_train_config(tmp_path, recipe, base=[])
    settings = [
        {k: v for k, v in OmegaConf.to_container(c).items() if k != "hydra"} for c in (experiment, overridden)
    ]
    assert settings[0] == settings[1]
    demo = compose_train_config(tmp_path, ["loss=clip_filip"], base=[])
    assert demo.data.hard_negatives is None and experiment.data.hard_negatives.per_caption == 8
