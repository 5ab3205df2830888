"""Statements (`data.hard_negatives.form=statement`): one attribute a caption states, said alone,
in a group with its other values; the losses against loop references, on 2 gloo ranks too."""

from __future__ import annotations

import importlib
from collections import Counter
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from flip.data.captions import CaptionGrammar
from flip.data.faceshapes import FACESHAPES_GRAMMAR
from flip.data.foils import FoilMaker, hard_negatives
from flip.data.transform import SampleTransform
from flip.losses import ClipLoss, FilipLoss, SigLipLoss
from flip.losses.foils import centred_statement_logits, pooled_foil_logits
from flip.models.outputs import EncoderOutput
from flip.training.module import FlipLitModule, check_foils_used

from .helpers import MODEL, OPTIM, compose_train_config, loss_file
from .helpers.gradients import assert_gradients_close
from .helpers.ranks import assert_two_ranks_equal_one_process
from .test_foils import claims, faceshapes_record
from .test_losses_foils import IN, NI, NT, Towers, assert_loss_is_the_references, late, late_t2i
from .test_losses_foils import batch as foil_batch
from .test_losses_foils import loss_and_grads as foil_loss_and_grads

B, G, V = 4, 2, 3

# -- the data: what a statement says --------------------------------------------------------------


@pytest.mark.parametrize("wording", ["varied", "plain"])
def test_each_group_states_a_claimed_value_first_and_then_the_attributes_other_values(wording):
    grammar = CaptionGrammar(FACESHAPES_GRAMMAR)
    maker = FoilMaker(source="grammar", per_caption=3, form="statement", wording=wording)
    assert maker.slot_shape == (3, 5)  # expression and hair colour have five values
    stated = Counter()
    for index in range(80):
        record, text = faceshapes_record(index)
        claimed = {(name, value) for name, value in record["mentions"]}
        slots = maker({"text": text, "json": record, "__seed__": index})
        assert len(slots) % 5 == 0 and 0 < len(slots) <= 15
        groups = [slots[i : i + 5] for i in range(0, len(slots), 5)]
        assert len({group[0].attribute for group in groups}) == len(groups)  # one group per attribute
        for group in groups:
            first, *others = [slot for slot in group if slot is not None]
            assert group.index(None) == len(others) + 1 if None in group else len(others) == 4
            # the lead says what the caption says, read back with the grammar's own words
            assert (first.attribute, first.old) in claimed and first.new == first.old
            assert claims(grammar, first.text) == {(first.attribute, first.old)}, first.text
            values = set(grammar.attributes[first.attribute].entries) - {first.old}
            assert {slot.new for slot in others} == values  # every other value, once each
            for slot in others:
                assert claims(grammar, slot.text) == {(slot.attribute, slot.new)}, slot.text
                # the same noun phrase around the changed words
                assert slot.text.split()[:2] == first.text.split()[:2]
            assert len(first.text.split()) <= 8  # a noun phrase, not a caption
            stated[first.attribute] += 1
    assert len(stated) >= 10  # groups drawn among every attribute the captions state


def test_a_statement_phrase_is_one_whose_conditions_the_face_meets_on_every_face():
    """Phrases are kept by the values their conditions read: each face, in any order, gets the
    phrases a direct check of every condition on it gives ("without glasses" never for a face
    in sunglasses)."""
    foils = FoilMaker(source="grammar", form="statement").grammars["faceshapes"]
    faces = [foils._record(faceshapes_record(index)[0]) for index in range(150)]
    seen = 0
    for record in faces + faces[::-1]:
        for name, attribute in foils.grammar.attributes.items():
            for value in attribute.entries:
                changed = {**record, name: value}
                direct = tuple(
                    form.text
                    for form in foils.by_value.get((name, value, "post"), [])
                    if all(changed.get(key) == wanted for key, wanted in form.when)
                )
                assert foils.post_phrases(name, value, record) == direct, (name, value, record)
                seen += any(form.when for form in foils.by_value.get((name, value, "post"), []))
        if record["sunglasses"]:
            assert "without glasses" not in foils.post_phrases("eyeglasses", False, record)
    assert seen > 1000  # conditions were read, not only phrases without any


def statement_texts(wording: str, records: int = 300) -> dict[tuple[str, object], set[str]]:
    """Every statement the maker says for each (attribute, value) over FaceShapes records."""
    maker = FoilMaker(source="grammar", per_caption=13, form="statement", wording=wording)
    said: dict[tuple[str, object], set[str]] = {}
    for index in range(records):
        record, text = faceshapes_record(index)
        for slot in maker({"text": text, "json": record, "__seed__": index}):
            if slot is not None:
                said.setdefault((slot.attribute, slot.new), set()).add(slot.text)
    return said


def test_plain_statements_say_each_value_one_way_in_words_the_varied_ones_use():
    plain, varied = statement_texts("plain"), statement_texts("varied")
    assert set(plain) == set(varied) and len(plain) >= 30  # every value of every attribute
    for value, texts in plain.items():
        assert len(texts) == 1, (value, texts)
        (text,) = texts
        assert text in varied[value] and text.startswith("a person ")  # the grammar's first noun
    assert sum(map(len, varied.values())) > 5 * len(plain)  # what the model encodes per batch


def test_statements_follow_the_attribute_weights_and_the_samples_seed():
    record, text = next(
        (record, text)
        for record, text in map(faceshapes_record, range(100))
        if {"expression", "hat"} <= {name for name, _ in record["mentions"]}
    )
    other = "hat"
    maker = hard_negatives(
        {
            "source": "grammar",
            "per_caption": 1,
            "form": "statement",
            "attributes": {"expression": 9, other: 1},
        }
    )
    leads = [maker({"text": text, "json": record, "__seed__": seed})[0].attribute for seed in range(400)]
    share = leads.count("expression") / len(leads)
    assert 0.84 < share < 0.96  # 0.9
    assert set(leads) == {"expression", other}  # only the allowed attributes
    again = [maker({"text": text, "json": record, "__seed__": seed})[0].attribute for seed in range(400)]
    assert again == leads


def test_statement_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match=r"form='sentence'; accepted: caption .* or statement"):
        hard_negatives({"form": "sentence"})
    with pytest.raises(ValueError, match=r"form=statement needs source=grammar, not 'table'"):
        hard_negatives({"source": "table", "form": "statement"})
    with pytest.raises(ValueError, match=r"wording='terse'; accepted: varied .* or plain"):
        hard_negatives({"source": "grammar", "form": "statement", "wording": "terse"})
    with pytest.raises(ValueError, match=r"wording='plain' words statements; with form='caption'"):
        hard_negatives({"source": "grammar", "wording": "plain"})
    clip_filip = {
        "terms": {
            "clip": {"loss": {"_target_": "flip.losses.ClipLoss", "foil_choice_weight": 0.0}},
            "filip": {"loss": {"_target_": "flip.losses.FilipLoss"}},
        }
    }
    statements = {"source": "grammar", "form": "statement"}
    with pytest.raises(ValueError, match=r"no term of this loss .* scores statements.*foil_choice_weight"):
        check_foils_used(clip_filip, statements)
    clip_filip["terms"]["filip"]["loss"]["foil_choice_weight"] = 1.0
    check_foils_used(clip_filip, statements)
    check_foils_used({"terms": {"siglip": {"loss": {"_target_": "flip.losses.SigLipLoss"}}}}, statements)


def test_a_batch_of_statements_carries_a_mask_per_group_and_value(tiny_model):
    from PIL import Image

    maker = FoilMaker(source="grammar", per_caption=2, form="statement", attributes=["expression", "beard"])
    transform = SampleTransform(tiny_model.preprocess_train, tiny_model.tokenizer, foils=maker)
    samples = []
    for index in range(3):
        record, text = faceshapes_record(index)
        samples.append({"image": Image.new("RGB", (32, 32)), "text": text, "json": record, "__seed__": index})
    samples[2]["json"] = {**samples[2]["json"], "mentions": []}  # states nothing it could say alone
    _, tokens, foil_tokens, mask = transform.collate([transform.prepare(s) for s in samples])
    assert mask.shape == (3, 2, 5) and foil_tokens.shape == (3, 10, tokens.shape[1])
    assert not mask[2].any()
    for index in range(2):
        slots = maker(samples[index])
        present = [slot is not None for slot in slots] + [False] * (10 - len(slots))
        assert mask[index].flatten().tolist() == present
        texts = [slot.text if slot is not None else "" for slot in slots] + [""] * (10 - len(slots))
        assert torch.equal(foil_tokens[index], tiny_model.tokenizer(texts))


def test_repeated_foils_are_encoded_once_with_the_same_features_and_gradients(tiny_model):
    words = ["a person who looks sad", "a person who looks happy", "a face with a beard"]
    rows = [words[i % 3] for i in range(12)]
    foils = tiny_model.tokenizer(rows).view(3, 4, -1)
    counted = []
    handle = tiny_model.clip.token_embedding.register_forward_hook(
        lambda _m, args, _o: counted.append(args[0].shape[0])
    )
    try:
        for return_tokens in (False, True):
            tiny_model.zero_grad()
            counted.clear()
            encoded = tiny_model.encode_foils(foils, return_tokens)
            assert sum(counted) == 3  # three distinct rows, each encoded once
            weights = torch.linspace(-1, 1, 12)[:, None]
            features = encoded["foil_text_features"].reshape(12, -1)
            (features.float() * weights).sum().backward()
            grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
            tiny_model.zero_grad()
            alone = [F.normalize(tiny_model.encode_text(tiny_model.tokenizer([row])), dim=-1) for row in rows]
            (torch.cat(alone).float() * weights).sum().backward()
            expected = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
            torch.testing.assert_close(features, torch.cat(alone).detach(), atol=1e-5, rtol=1e-5)
            assert_gradients_close(grads, expected)
    finally:
        handle.remove()


# -- the losses: references written as loops over the groups ---------------------------------------


def statement_batch(n: int, rows: slice = slice(None)):
    g = torch.Generator().manual_seed(11)
    images, texts = torch.randn(n, NI, IN, generator=g), torch.randn(n, NT, IN, generator=g)
    mask = torch.arange(NT)[None] < torch.randint(2, NT + 1, (n,), generator=g)[:, None]
    foils = torch.randn(n, G * V, NT, IN, generator=g)
    foil_token_mask = (
        torch.arange(NT)[None, None] < torch.randint(2, NT + 1, (n, G * V), generator=g)[..., None]
    )
    # a group holds its lead and 1 or 2 more values (V: the largest), or is absent
    sizes = torch.randint(2, V + 1, (n, G), generator=g) * (torch.rand(n, G, generator=g) < 0.75)
    sizes[0], sizes[1] = 0, V  # a caption with no group, one with both full
    foil_mask = torch.arange(V)[None, None] < sizes[..., None]
    return tuple(t[rows] for t in (images, texts, mask, foils, foil_token_mask, foil_mask))


def groups_of(out: EncoderOutput, i: int, score) -> list[list[torch.Tensor]]:
    """Each present group of row i as its slots' logits, the lead first."""
    found = []
    for group in range(G):
        slots = [group * V + v for v in range(V) if out.foil_mask[i, group, v]]
        if slots:
            found.append([score(i, slot) for slot in slots])
    return found


def plain_contrastive(out: EncoderOutput, pair) -> torch.Tensor:
    n = out.image_features.shape[0]
    image_terms = [-torch.log_softmax(torch.stack([pair(i, j) for j in range(n)]), 0)[i] for i in range(n)]
    text_terms = [-torch.log_softmax(torch.stack([pair(j, i) for j in range(n)]), 0)[i] for i in range(n)]
    return (torch.stack(image_terms).mean() + torch.stack(text_terms).mean()) / 2


def choice(out: EncoderOutput, score, weight: float) -> torch.Tensor:
    n = out.image_features.shape[0]
    total = 0.0
    for i in range(n):
        for logits in groups_of(out, i, score):
            total = total - torch.log_softmax(torch.stack(logits), 0)[0]
    return weight * total / n


def clip_statements(out: EncoderOutput, weight: float) -> torch.Tensor:
    s = out.logit_scale
    flat = out.foil_text_features

    def pair(i, j):
        return s * out.image_features[i] @ out.text_features[j]

    return plain_contrastive(out, pair) + choice(
        out, lambda i, f: s * out.image_features[i] @ flat[i, f], weight
    )


def clip_centred_statements(out: EncoderOutput, weight: float) -> torch.Tensor:
    """The clip term with each group's statements scored as their differences from the group's
    mean, over the root-mean-square of those differences."""
    s = out.logit_scale

    def pair(i, j):
        return s * out.image_features[i] @ out.text_features[j]

    n, total = out.image_features.shape[0], 0.0
    for i in range(n):
        for group in range(G):
            slots = [group * V + v for v in range(V) if out.foil_mask[i, group, v]]
            if not slots:
                continue
            texts = out.foil_text_features[i, slots]
            differences = texts - texts.mean(0)
            spread = differences.square().sum(1).mean().sqrt()
            logits = s * differences @ out.image_features[i] / spread
            total = total - torch.log_softmax(logits, 0)[0]
    return plain_contrastive(out, pair) + weight * total / n


def filip_statements(out: EncoderOutput, weight: float) -> torch.Tensor:
    s, it = out.logit_scale, out.image_tokens

    def pair(i, j):
        return s * late(it[i], out.text_tokens[j], out.text_token_mask[j])

    n = out.image_features.shape[0]
    image_terms = [-torch.log_softmax(torch.stack([pair(i, j) for j in range(n)]), 0)[i] for i in range(n)]
    text_terms = []
    for i in range(n):
        column = [s * late_t2i(it[j], out.text_tokens[i], out.text_token_mask[i]) for j in range(n)]
        text_terms.append(-torch.log_softmax(torch.stack(column), 0)[i])
    contrastive = (torch.stack(image_terms).mean() + torch.stack(text_terms).mean()) / 2

    def score(i, f):
        return s * late(it[i], out.foil_text_tokens[i, f], out.foil_text_token_mask[i, f])

    return contrastive + choice(out, score, weight)


def siglip_statements(out: EncoderOutput) -> torch.Tensor:
    n, s, b = out.image_features.shape[0], out.logit_scale, out.logit_bias
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = s * out.image_features[i] @ out.text_features[j] + b
            total = total - F.logsigmoid(z if i == j else -z)
        for logits in groups_of(
            out, i, lambda i, f: s * out.image_features[i] @ out.foil_text_features[i, f] + b
        ):
            total = total - F.logsigmoid(logits[0]) - sum(F.logsigmoid(-z) for z in logits[1:])
    return total / n


REFERENCES = {
    "clip": (lambda: ClipLoss(foil_choice_weight=0.7), lambda out: clip_statements(out, 0.7), False),
    "filip": (
        lambda: FilipLoss(chunk_size=3, foil_choice_weight=0.7),
        lambda out: filip_statements(out, 0.7),
        False,
    ),
    "clip-centred": (
        lambda: ClipLoss(foil_choice_weight=0.7, foil_choice_centred=True),
        lambda out: clip_centred_statements(out, 0.7),
        False,
    ),
    "siglip": (lambda: SigLipLoss(), siglip_statements, True),
    # without the choice term statements add nothing to the clip loss (refused at start-up)
    "clip-no-choice": (lambda: ClipLoss(), lambda out: clip_statements(out, 0.0), False),
}


# the 2-rank check (`CASES`) calls this with the foil tests' signature
loss_and_grads = partial(foil_loss_and_grads, make_batch=statement_batch)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_statement_groups_are_scored_as_the_reference_computes(name):
    assert_loss_is_the_references(*REFERENCES[name], make_batch=statement_batch)


def test_a_lead_statement_is_the_positive_of_its_group():
    """Swapping a group's lead with another of its values changes the choice term: the lead is
    the answer, not one negative among others."""
    model = Towers()
    out = model(*statement_batch(2 * B))
    loss = ClipLoss(foil_choice_weight=1.0).loss_from_outputs(out)
    order = list(range(G * V))
    order[0], order[1] = 1, 0  # row 1's first group is full: its lead is now a foil
    swapped = EncoderOutput(**{**out.__dict__, "foil_text_features": out.foil_text_features[:, order]})
    assert abs(ClipLoss(foil_choice_weight=1.0).loss_from_outputs(swapped).item() - loss.item()) > 1e-3


def test_the_centred_choice_keeps_each_groups_order_at_any_likeness_of_its_statements():
    """Centred, a group's logits are an increasing map of its raw ones, so the zero-shot choice
    reads what the term trains; and statements ten thousand times as alike (a young text tower's)
    score the same, where their raw logits, and the gradient the image gets from them, shrink."""
    out = Towers()(*statement_batch(2 * B))
    mask, flat = out.foil_mask, out.foil_text_features
    anchor = flat.mean(dim=1, keepdim=True)
    alike = anchor + 1e-4 * (flat - anchor)
    scale = torch.tensor(10.0)
    spread = {}
    for name, features in (("apart", flat), ("alike", alike)):
        raw = pooled_foil_logits(out.image_features, features, mask.flatten(1), scale).view(mask.shape)
        centred = centred_statement_logits(out.image_features, features, mask, scale).view(mask.shape)
        for i, group in mask[:, :, 0].nonzero().tolist():
            present = mask[i, group]
            assert raw[i, group, present].argsort().tolist() == centred[i, group, present].argsort().tolist()
            assert centred[i, group, ~present].isneginf().all()
        present = mask[1]  # row 1: both groups full
        spread[name] = (raw[1][present].std().item(), centred[1][present].std().item())
    assert spread["alike"][0] < 1e-3 * spread["apart"][0]
    assert spread["alike"][1] == pytest.approx(spread["apart"][1], rel=1e-2)
    with pytest.raises(ValueError, match="foil_choice_centred must be true or false, got 'yes'"):
        ClipLoss(foil_choice_weight=1.0, foil_choice_centred="yes")


@pytest.mark.parametrize(
    ("module", "scorer", "make"),
    [
        ("flip.losses.clip", "pooled_foil_logits", ClipLoss),
        ("flip.losses.filip", "foil_token_similarity", partial(FilipLoss, chunk_size=3)),
    ],
)
def test_a_term_scores_statements_only_at_steps_its_choice_weight_reads_them(
    module, scorer, make, monkeypatch
):
    """Statements never join the batch's softmax: a term whose choice is off at this step gives
    the same loss without them, so it does not score them."""
    calls = []
    original = getattr(importlib.import_module(module), scorer)
    monkeypatch.setattr(f"{module}.{scorer}", lambda *a, **k: calls.append(1) or original(*a, **k))
    statements = Towers()(*statement_batch(2 * B))
    without = EncoderOutput(**{**statements.__dict__, "foil_text_features": None, "foil_text_tokens": None})
    later = make(foil_choice_weight=1.0, foil_choice_start_step=5)
    for loss in (make(), later):  # no choice term; a choice term from a later step
        assert loss.loss_from_outputs(statements).item() == pytest.approx(
            loss.loss_from_outputs(without).item()
        )
    assert not calls
    later.at_step(5)
    later.loss_from_outputs(statements)
    assert len(calls) == 1
    captions = Towers()(*foil_batch(2 * B))  # caption foils are extra negatives at every step
    make().loss_from_outputs(captions)
    assert len(calls) == 2


# -- 2 gloo ranks ---------------------------------------------------------------------------------

CASES = {
    "clip-local": (
        lambda r, w: ClipLoss(
            local_loss=True, gather_with_grad=True, rank=r, world_size=w, foil_choice_weight=2.0
        ),
        False,
    ),
    "clip-global": (
        lambda r, w: ClipLoss(gather_with_grad=True, rank=r, world_size=w, foil_choice_weight=2.0),
        False,
    ),
    "clip-centred": (
        lambda r, w: ClipLoss(
            local_loss=True,
            gather_with_grad=True,
            rank=r,
            world_size=w,
            foil_choice_weight=2.0,
            foil_choice_centred=True,
        ),
        False,
    ),
    "filip-global": (
        lambda r, w: FilipLoss(
            gather_with_grad=True, rank=r, world_size=w, chunk_size=3, foil_choice_weight=2.0
        ),
        False,
    ),
    "siglip": (lambda r, w: SigLipLoss(rank=r, world_size=w), True),
}


@pytest.mark.slow
def test_two_ranks_with_statements_equal_one_process_on_the_global_batch(tmp_path):
    assert_two_ranks_equal_one_process("tests.test_statements", tmp_path)


# -- the training module: foils cut to the positions they use --------------------------------------


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_foils_are_cut_after_their_last_used_position_with_the_same_features_and_loss(micro_batches):
    loss_cfg, _ = loss_file("clip_filip")
    for term in loss_cfg["terms"].values():
        term["loss"]["foil_choice_weight"] = 1.0
    torch.manual_seed(0)
    module = FlipLitModule({**MODEL, "text_length_buckets": 2}, loss_cfg, OPTIM, micro_batches=micro_batches)
    words = ["a person who looks sad", "a face with a beard", "an individual wearing a hat"]
    text = module.model.tokenize([f"a photo of a person with bangs and {w}" for w in words + words[:1]])
    foils = module.model.tokenize([words[i % 3] for i in range(4 * 2 * 2)]).view(4, 4, -1)
    mask = torch.tensor([[True, True, False, False], [True, False, True, True]] * 2).view(4, 2, 2)
    images = torch.randn(4, 3, 32, 32)
    longest = int((foils != 0).sum(-1).max())
    assert module.model.trim_foils(foils).shape[-1] == longest < foils.shape[-1]
    cut = module(images, text, foils, mask)
    whole = module.model(images, text, True, foils, mask)  # the model alone does not cut
    assert cut.foil_text_tokens.shape[2] == longest
    torch.testing.assert_close(cut.foil_text_features, whole.foil_text_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        cut.foil_text_tokens, whole.foil_text_tokens[:, :, :longest], atol=1e-5, rtol=1e-5
    )
    assert not whole.foil_text_token_mask[:, :, longest:].any()  # what was cut was padding
    cut_loss, whole_loss = module.criterion(cut)["loss"], module.criterion(whole)["loss"]
    assert cut_loss.item() == pytest.approx(whole_loss.item(), abs=1e-5)
    # a tower where padding reaches the features keeps every position
    torch.manual_seed(0)
    plain = FlipLitModule(MODEL, loss_cfg, OPTIM)
    assert plain.model.trim_foils(foils) is foils


def _statements_module(filip_start: int, micro_batches: int = 1) -> tuple[FlipLitModule, list]:
    """A clip + filip module whose filip choice starts at `filip_start` (clip's at once), and a
    batch of 4 images with 2 statement groups of 2 each."""
    loss_cfg, _ = loss_file("clip_filip")
    loss_cfg["terms"]["clip"]["loss"]["foil_choice_weight"] = 1.0
    loss_cfg["terms"]["filip"]["loss"].update(foil_choice_weight=1.0, foil_choice_start_step=filip_start)
    torch.manual_seed(0)
    module = FlipLitModule(MODEL, loss_cfg, OPTIM, micro_batches=micro_batches)
    words = ["a person who looks sad", "a person who looks happy", "a person with a hat"]
    text = module.model.tokenize([f"a photo of a person with bangs and {w}" for w in words + words[:1]])
    foils = module.model.tokenize([words[i % 3] for i in range(4 * 2 * 2)]).view(4, 4, -1)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]] * 2).view(4, 2, 2)
    return module, [torch.randn(4, 3, 32, 32), text, foils, mask]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_statement_tokens_are_encoded_only_at_steps_a_term_reads_them(micro_batches):
    """FILIP reads statements' token features only through its choice term: before that term's
    start the model leaves them out, for the same loss; caption foils' it reads at every step."""
    module, (images, text, foils, mask) = _statements_module(filip_start=5, micro_batches=micro_batches)
    module.criterion.at_step(4)
    early = module(images, text, foils, mask)
    assert early.foil_text_tokens is None and early.foil_text_token_mask is None
    assert early.foil_text_features is not None  # the clip term's choice reads the pooled ones
    with_tokens = module.model(images, text, True, module.model.trim_foils(foils), mask)
    assert with_tokens.foil_text_tokens is not None
    torch.testing.assert_close(early.foil_text_features, with_tokens.foil_text_features, atol=1e-5, rtol=1e-5)
    assert module.criterion(early)["loss"].item() == pytest.approx(
        module.criterion(with_tokens)["loss"].item()
    )
    module.criterion.at_step(5)
    assert module(images, text, foils, mask).foil_text_tokens is not None
    module.criterion.at_step(0)
    assert module(images, text, foils, mask.flatten(1)).foil_text_tokens is not None  # caption foils


def test_a_training_step_sets_the_step_before_encoding_what_its_terms_read(monkeypatch):
    """The step's schedule decides which foil fields are encoded, so it is set before the forward:
    at the filip choice's first step the statements' tokens are there."""
    module, batch = _statements_module(filip_start=5)
    module.trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=10)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    encoded = []
    forward = module.model.forward
    monkeypatch.setattr(
        module.model, "forward", lambda *a, **k: encoded.append(forward(*a, **k)) or encoded[-1]
    )
    for step in (4, 5):
        monkeypatch.setattr(FlipLitModule, "global_step", property(lambda self, step=step: step))
        module.training_step(batch, 0)
        assert (encoded[-1].foil_text_tokens is not None) == (step == 5)


def test_the_demo_statements_experiment_is_the_demo_with_the_measured_statement_recipe(tmp_path):
    # experiment=demo_statements stands for the override line of the runs docs/training.md measured
    weights = "expression:6,beard:2,mustache:2,bangs:2,long_hair:1,hat:1,eyeglasses:1,sunglasses:1,"
    weights += "earrings:1,bald:1,lipstick:1,rosy_cheeks:1,hair_color:1"
    recipe = [
        "loss=clip_filip",
        "data.hard_negatives={source:grammar,form:statement,wording:plain,per_caption:5,"
        f"attributes:{{{weights}}}}}",
        "loss.terms.clip.loss.foil_choice_weight=3.0",
        "loss.terms.clip.loss.foil_choice_ramp_steps=200",
    ]
    experiment = compose_train_config(tmp_path, ["experiment=demo_statements"], base=[])
    overridden = compose_train_config(tmp_path, recipe, base=[])
    settings = [
        {k: v for k, v in OmegaConf.to_container(c).items() if k != "hydra"} for c in (experiment, overridden)
    ]
    assert settings[0] == settings[1]
    assert hard_negatives(OmegaConf.to_container(experiment.data.hard_negatives)).slot_shape == (5, 5)


def test_the_demos_loss_brings_its_statements_and_another_loss_leaves_them_out(tmp_path):
    """conf/loss/clip_statements.yaml chooses among statements, so it sets them; `loss=...` of the
    demo drops them with it, and `+data/hard_negatives=statements` gives them to another loss."""
    demo = compose_train_config(tmp_path, [], base=[])
    assert demo.loss.terms.clip.loss.foil_choice_centred is True
    statements = OmegaConf.to_container(demo.data.hard_negatives)
    assert hard_negatives(statements).slot_shape == (7, 5) and statements["form"] == "statement"
    for loss in ("clip", "siglip", "clip_filip", "filip"):
        assert compose_train_config(tmp_path, [f"loss={loss}"], base=[]).data.hard_negatives is None
    added = compose_train_config(tmp_path, ["loss=siglip", "+data/hard_negatives=statements"], base=[])
    assert OmegaConf.to_container(added.data.hard_negatives) == statements
    beside_filip = compose_train_config(tmp_path, ["experiment=demo_statements"], base=[])
    assert OmegaConf.to_container(beside_filip.data.hard_negatives) == {**statements, "per_caption": 5}
