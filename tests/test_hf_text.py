"""Hugging Face BERT-family text towers, built by open_clip from a local folder the test writes
(a tiny BertConfig, a word-piece vocabulary, optionally weights): nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from transformers import BertModel

import flip
from flip.models import build_model
from flip.models.pretrained import weightless
from flip.training.run import train

from .helpers import SHARDS_BASE, TINY_ARCH, compose_train_config, write_caption_shards
from .helpers.bert import bert_arch, write_tiny_bert


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooled_text_feature_is_the_projected_cls_token_or_the_masked_mean(bert_dir, pooling):
    model = build_model(f"flip-test-bert-{pooling}", bert_arch(bert_dir, pooling)).eval()
    text = model.tokenize(["a person with red hair", "smiling"])
    assert text.shape == (2, 16) and text[0, 0] == 2 and (text[1] == 0).sum() > 0  # [CLS] first, padded
    encoder = model.clip.text
    with torch.no_grad():
        mask = text != 0
        hidden = encoder.transformer(input_ids=text, attention_mask=mask.long()).last_hidden_state
        if pooling == "cls":
            reference = hidden[:, 0]
        else:
            reference = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        reference = reference @ encoder.proj.weight.T  # the linear projection to the joint dimension
        torch.testing.assert_close(model.encode_text(text), reference, atol=1e-5, rtol=0)
        assert model.encode_text(text).shape == (2, TINY_ARCH["embed_dim"])
        # the token path (for FILIP) pools to the same feature and masks the padding
        out = model(torch.randn(2, 3, 32, 32), text, return_tokens=True)
    torch.testing.assert_close(out.text_features, F.normalize(reference, dim=-1), atol=1e-5, rtol=0)
    assert out.text_tokens.shape == (2, 16, TINY_ARCH["embed_dim"])
    assert out.text_token_mask.tolist() == mask.tolist()  # [CLS] included: it reads the whole caption


def test_weights_come_from_the_local_folder_when_pretrained_and_never_in_the_recipe(tmp_path, bert_dir):
    saved = BertModel.from_pretrained(bert_dir, add_pooling_layer=False)
    model = build_model("flip-test-bert-pre", bert_arch(bert_dir, pretrained=True))
    ours = model.clip.text.transformer.state_dict()
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    fresh = build_model("flip-test-bert-fresh", bert_arch(bert_dir, pretrained=False))
    key = "embeddings.word_embeddings.weight"
    assert not torch.equal(fresh.clip.text.transformer.state_dict()[key], saved.state_dict()[key])
    fresh.clip.set_grad_checkpointing(True)  # what grad_checkpointing=true does: both towers
    assert fresh.clip.text.transformer.is_gradient_checkpointing
    assert fresh.clip.visual.transformer.grad_checkpointing
    recipe = weightless({"name": "x", "pretrained": "openai", "arch": bert_arch(bert_dir, pretrained=True)})
    assert recipe["arch"]["text_cfg"]["hf_model_pretrained"] is False and recipe["pretrained"] is None


def test_unknown_pooling_or_projection_is_refused_with_the_choices(bert_dir):
    with pytest.raises(ValueError, match=r"hf_pooler_type='first' is not a pooling.*cls.*mean"):
        build_model("flip-test-bert-bad", bert_arch(bert_dir, pooling="first"))
    with pytest.raises(ValueError, match=r"hf_proj_type='conv'.*linear.*mlp"):
        build_model("flip-test-bert-bad2", bert_arch(bert_dir, projection="conv"))


@pytest.mark.slow
def test_a_bert_text_tower_trains_through_train_py_and_reloads_offline(tmp_path, bert_dir):
    shards = Path(write_caption_shards(tmp_path / "shards", count=64, per_shard=32)[0]).parent
    cfg = compose_train_config(
        tmp_path,
        [f"data.train_shards={shards}", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16",
         "loss=clip_filip", "trainer.max_steps=4", "trainer.val_check_interval=null",
         "model.name=flip-test-bert"],
        SHARDS_BASE,
    )  # fmt: skip
    with open_dict(cfg):
        cfg.model.arch.text_cfg = bert_arch(bert_dir, pretrained=True)["text_cfg"]
    torch.manual_seed(0)
    initial = build_model("flip-test-bert", bert_arch(bert_dir, pretrained=True)).state_dict()
    results = train(cfg)
    assert {"train/clip", "train/filip"} <= set(results["train"])
    assert all(torch.isfinite(torch.tensor(v)) for v in results["train"].values())
    model = flip.load(tmp_path / "run" / "checkpoints" / "last.ckpt")  # HF_HUB_OFFLINE: a fetch would fail
    trained = model.state_dict()
    key = "clip.text.transformer.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(trained[key], initial[key])  # the BERT tower itself was trained
    text = model.tokenize(["a red square", "a blue square"])
    with torch.no_grad():
        features = model.encode_text(text, normalize=True)
    assert features.shape == (2, 32) and torch.isfinite(features).all()
