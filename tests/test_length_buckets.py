"""model.text_length_buckets: captions encoded in groups cut to their longest caption give the
features and gradients of the whole context (open_clip's causal tower, Hugging Face towers),
and are refused where they would not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flip.models import build_model
from flip.models.length_buckets import caption_lengths

from .conftest import TINY_ARCH
from .helpers.bert import bert_arch, write_tiny_bert
from .helpers.gradients import assert_gradients_close


def captions(model, count: int = 37) -> torch.Tensor:
    """Token ids of captions from 1 to 16 words, in shuffled order, some at the full context."""
    words = "a person with red hair and a green hat the face with a blue square".split(" ")  # noqa: SIM905
    texts = [" ".join(words[: 1 + i % len(words)] * (1 + (i % 7 == 0) * 4)) for i in range(count)]
    return model.tokenize(texts)[torch.randperm(count, generator=torch.Generator().manual_seed(0))]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("bert"))


def twins(tower: str, buckets: int, bert_dir: Path):
    """The same tiny model twice, whole context and in length buckets: open_clip's causal text
    tower, or a BERT tower pooling its [CLS] token or the mean of its tokens."""
    if tower == "causal":
        name, arch = "flip-test-tiny", TINY_ARCH
    else:
        name, arch = f"flip-test-{tower}", bert_arch(bert_dir, tower.removeprefix("bert-"))
    torch.manual_seed(0)
    whole = build_model(name, arch)
    torch.manual_seed(0)
    bucketed = build_model(name, arch, text_length_buckets=buckets)
    return whole.eval(), bucketed.eval()  # no dropout: BERT's would draw differently in each


def test_caption_lengths_end_at_the_last_token_that_is_not_padding():
    text = torch.tensor([[5, 7, 9, 0, 0], [5, 0, 7, 0, 0], [5, 7, 9, 8, 6], [0, 0, 0, 0, 0]])
    assert caption_lengths(text, 0).tolist() == [3, 3, 5, 0]


@pytest.mark.parametrize(
    ("tower", "buckets"),
    [("causal", 1), ("causal", 3), ("causal", 100), ("bert-cls", 3), ("bert-mean", 100)],
)
def test_length_buckets_give_the_whole_contexts_features_and_gradients(tower, buckets, bert_dir):
    whole, bucketed = twins(tower, buckets, bert_dir)
    text = captions(whole)
    lengths = caption_lengths(text, whole.pad_token_id)
    assert lengths.min() < 6 and lengths.max() == text.shape[1]  # short captions and full ones
    mask = whole.informative_text_tokens(text)

    outputs = {}
    for name, model in (("whole", whole), ("bucketed", bucketed)):
        pooled, tokens, hidden = model._text_with_tokens(text, hidden=True)
        features = model.encode_text(text, normalize=True)
        # a loss that reads the pooled and the unmasked token features (as FILIP's mask does)
        loss = (pooled.square().sum() + (tokens * mask[..., None]).sin().sum() + features.sum()) / len(text)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs[name] = (pooled, tokens * mask[..., None], hidden * mask[..., None], features, grads)

    (pooled, tokens, hidden, features, grads), expected = outputs["bucketed"], outputs["whole"]
    torch.testing.assert_close(pooled, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, expected[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features, expected[3], rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected[4].keys() and any("embedding" in name for name in grads)
    assert_gradients_close(grads, expected[4])
    # a caption in a group of its own is encoded only as long as it is: beyond that, zeros
    _, raw_tokens = bucketed._text_with_tokens(text)
    beyond = torch.arange(text.shape[1]) >= lengths[:, None]
    if buckets >= len(text):
        assert raw_tokens[beyond].abs().max() == 0
    assert (raw_tokens[beyond].abs().sum(-1) == 0).any() == (buckets > 1)


def test_a_batch_looks_its_token_embeddings_up_once_whatever_the_buckets():
    # each lookup's backward fills a gradient the size of the vocabulary's table: once per batch
    model = build_model("flip-test-tiny", TINY_ARCH, text_length_buckets=5)
    calls = []
    model.clip.token_embedding.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    text = captions(model)
    _, tokens = model._text_with_tokens(text)
    assert calls == [text.shape] and tokens.shape[:2] == text.shape


def test_length_buckets_are_kept_in_the_models_config_and_refused_where_inexact():
    model = build_model("flip-test-tiny", TINY_ARCH, text_length_buckets=4)
    assert model.config["text_length_buckets"] == 4 and model.text_length_buckets == 4
    assert "text_length_buckets" not in build_model("flip-test-tiny", TINY_ARCH).config
    for bad in (-1, 2.5, "4", True):
        with pytest.raises(ValueError, match=r"model.text_length_buckets=.*accepted: null or 0"):
            build_model("flip-test-tiny", TINY_ARCH, text_length_buckets=bad)
    # a causal tower pooling its last position would read the padding there
    last = {**TINY_ARCH, "text_cfg": {**TINY_ARCH["text_cfg"], "pool_type": "last"}}
    with pytest.raises(ValueError, match="pool_type: last"):
        build_model("flip-test-tiny-last", last, text_length_buckets=4)
