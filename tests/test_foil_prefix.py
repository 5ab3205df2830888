"""Foils encoded from where they leave their captions (flip.models.foil_prefix) give the features
and gradients of foils encoded whole, run only their suffixes through the tower, and fall back
to the whole encoding where reuse would not be exact."""

from __future__ import annotations

import pytest
import torch

from flip.models import build_model
from flip.models.foil_prefix import first_differences, shares_foil_prefixes, suffixes, tokens_with_prefix

from .conftest import TINY_ARCH
from .helpers.gradients import assert_gradients_close

CAPTIONS = [
    "a smiling person with red hair, a green hat and no glasses",
    "a person with a beard",
    "an angry child with bangs, long black hair and earrings, not wearing a hat",
]
# per caption: foils that change a word at the start, in the middle, at the end, add words at
# the end, and one equal to its caption (no first difference: encoded whole)
FOILS = [
    [
        "a frowning person with red hair, a green hat and no glasses",
        "a smiling person with blue hair, a green hat and no glasses",
        "a smiling person with red hair, a green hat and glasses",
        "a smiling person with red hair, a green hat and no glasses",
    ],
    [
        "a person without a beard",
        "a person with a beard and a mustache",
        "a child with a beard",
        "a person with a short beard",
    ],
    [
        "a happy child with bangs, long black hair and earrings, not wearing a hat",
        "an angry child without bangs, long black hair and earrings, not wearing a hat",
        "an angry child with bangs, short black hair and earrings, not wearing a hat",
        "an angry child with bangs, long black hair and earrings, wearing a hat",
    ],
]


def _arch(block_type: str) -> dict:
    text_cfg = {**TINY_ARCH["text_cfg"], "layers": 2, "block_type": block_type}
    return {**TINY_ARCH, "text_cfg": text_cfg}


def _model(block_type: str, buckets: int):
    torch.manual_seed(0)
    return build_model(
        "flip-test-tiny", _arch(block_type), text_length_buckets=buckets, foil_prefix_sharing=True
    ).eval()


def _inputs(model):
    torch.manual_seed(1)
    images = torch.randn(len(CAPTIONS), 3, 32, 32)
    text = model.tokenize(CAPTIONS)
    foils = model.tokenize([f for row in FOILS for f in row]).view(len(CAPTIONS), len(FOILS[0]), -1)
    mask = torch.tensor([[True, True, True, True], [True, False, True, True], [False, True, False, True]])
    return images, text, foils, mask


def _loss_and_grads(model, output) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A loss that reads every foil field at the slots that hold a foil (tokens where informative),
    and the caption's features; its gradients."""
    model.zero_grad()
    mask = output.foil_mask
    fields = {"features": output.foil_text_features[mask], "captions": output.text_features}
    if output.foil_text_tokens is not None:
        informative = output.foil_text_token_mask[mask]
        fields["tokens"] = output.foil_text_tokens[mask] * informative[..., None]
        fields["token_mask"] = informative
        fields["caption_tokens"] = output.text_tokens
    loss = sum(
        (value * torch.linspace(-1, 1, value.numel()).view_as(value)).sin().sum()
        for value in fields.values()
        if value.is_floating_point()
    )
    loss.backward()
    return fields, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("return_tokens", [False, True])
@pytest.mark.parametrize(
    ("block_type", "buckets", "checkpointed"),
    [("default", 0, False), ("custom", 0, False), ("custom", 3, False), ("default", 3, True)],
)
def test_foils_from_their_first_difference_equal_foils_encoded_whole(
    block_type, buckets, checkpointed, return_tokens
):
    model = _model(block_type, buckets)
    model.clip.set_grad_checkpointing(checkpointed)  # blocks recomputed in backward (grad_checkpointing)
    assert model.foil_prefix_sharing
    images, text, foils, mask = _inputs(model)

    shared = model(images, text, return_tokens, foils=foils, foil_mask=mask)
    got, grads = _loss_and_grads(model, shared)
    whole = model(images, text, return_tokens)
    whole.foil_mask = mask
    for name, value in model.encode_foils(foils, return_tokens, mask).items():
        setattr(whole, name, value)
    expected, expected_grads = _loss_and_grads(model, whole)

    assert got.keys() == expected.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert not shared.foil_text_features[~mask].any()  # a missing foil is zeros, never encoded
    assert grads.keys() == expected_grads.keys()
    assert_gradients_close(grads, expected_grads)


def test_only_each_foils_suffix_goes_through_the_tower():
    model = _model("custom", 0)
    images, text, foils, mask = _inputs(model)
    rows = foils[mask]
    owners = torch.arange(len(CAPTIONS)).repeat_interleave(len(FOILS[0])).view(mask.shape)[mask]
    starts = first_differences(rows, text[owners])
    lengths = (rows != model.pad_token_id).sum(1)
    seen = []
    handle = model.clip.token_embedding.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    try:
        model(images, text, foils=foils, foil_mask=mask)
    finally:
        handle.remove()
    captions, foil_ids = seen
    assert torch.equal(captions, text)
    # one row per foil that exists, each its tokens from the first that differs
    assert foil_ids.shape[0] == int(mask.sum())
    assert ((foil_ids != model.pad_token_id).sum(1) == lengths - starts).all()
    # the foil equal to its caption is encoded whole; the others skip at least "a"
    assert sorted(starts.tolist())[:1] == [0] and (starts > 0).sum() == len(starts) - 1


def test_first_differences_suffixes_and_tokens_with_prefix():
    foils = torch.tensor([[1, 5, 6, 9, 0], [1, 5, 7, 8, 9], [1, 5, 6, 9, 0]])
    captions = torch.tensor([[1, 5, 7, 9, 0], [1, 5, 7, 9, 0], [1, 5, 6, 9, 0]])
    starts = first_differences(foils, captions)
    assert starts.tolist() == [2, 3, 0]
    assert suffixes(foils, starts, 0).tolist() == [[6, 9, 0, 0, 0], [8, 9, 0, 0, 0], [1, 5, 6, 9, 0]]
    caption_tokens = torch.arange(15.0).view(3, 5, 1)
    suffix_tokens = -torch.arange(1.0, 16.0).view(3, 5, 1)
    whole = tokens_with_prefix(caption_tokens, suffix_tokens, starts).squeeze(-1)
    assert whole.tolist() == [[0, 1, -1, -2, -3], [5, 6, 7, -6, -7], [-11, -12, -13, -14, -15]]


def test_sharing_is_off_unless_asked_and_refused_where_it_would_not_be_exact():
    torch.manual_seed(0)
    default = build_model("flip-test-tiny", _arch("custom")).eval()
    assert not default.foil_prefix_sharing and "foil_prefix_sharing" not in default.config
    shared = _model("custom", 0)
    assert shared.config["foil_prefix_sharing"] is True  # a checkpoint rebuilds it as it trained
    images, text, foils, mask = _inputs(default)
    seen = []
    handle = default.clip.token_embedding.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    try:
        with torch.no_grad():
            default(images, text, foils=foils, foil_mask=mask)
    finally:
        handle.remove()
    # off: every foil encoded whole (each distinct one once, in any order)
    assert sorted(map(tuple, seen[1].tolist())) == sorted(set(map(tuple, foils[mask].tolist())))

    first = {**TINY_ARCH, "text_cfg": {**TINY_ARCH["text_cfg"], "pool_type": "first"}}
    bidirectional = {**TINY_ARCH, "text_cfg": {**TINY_ARCH["text_cfg"], "no_causal_mask": True}}
    for arch in (first, bidirectional):
        assert not shares_foil_prefixes(build_model("flip-test-tiny", arch).clip)
        with pytest.raises(ValueError, match=r"foil_prefix_sharing=true needs open_clip's causal text"):
            build_model("flip-test-tiny", arch, foil_prefix_sharing=True)
    with pytest.raises(ValueError, match=r"foil_prefix_sharing='yes'; accepted: true .* or false"):
        build_model("flip-test-tiny", TINY_ARCH, foil_prefix_sharing="yes")
