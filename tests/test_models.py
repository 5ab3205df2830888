import open_clip
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from flip.models import build_model

from .helpers import CONF, TINY_ARCH


def test_custom_architecture_builds_open_clip_towers_of_the_configured_shape(tiny_model):
    images = torch.randn(3, 3, 32, 32)
    text = tiny_model.tokenize(["a face with eyeglasses", "a bald head", "a hat"])
    assert text.shape == (3, TINY_ARCH["text_cfg"]["context_length"])
    assert tiny_model.encode_image(images).shape == (3, 32)
    assert tiny_model.encode_text(text).shape == (3, 32)
    # the custom name is an ordinary open_clip architecture now
    assert "flip-test-tiny" in open_clip.list_models()


def test_token_features_pool_to_the_same_embeddings_as_open_clip(tiny_model):
    images = torch.randn(2, 3, 32, 32)
    text = tiny_model.tokenize(["a person wearing a hat", "smiling"])
    with torch.no_grad():
        out = tiny_model(images, text, return_tokens=True)
        plain = tiny_model(images, text)
        expected_image = F.normalize(tiny_model.clip.encode_image(images), dim=-1)
        expected_text = F.normalize(tiny_model.clip.encode_text(text), dim=-1)
    torch.testing.assert_close(out.image_features, expected_image, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.text_features, expected_text, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain.image_features, expected_image, atol=1e-6, rtol=0)
    num_patches = (32 // 8) ** 2
    assert out.image_tokens.shape == (2, num_patches, 32)
    assert out.text_tokens.shape == (2, 24, 32)
    torch.testing.assert_close(out.image_tokens.norm(dim=-1), torch.ones(2, num_patches))
    # the mask marks the words and end-of-text, never the padding nor the causal tower's start
    # token, whose feature is the same for every caption
    lengths = out.text_token_mask.sum(dim=1)
    assert lengths.tolist() == [(row != 0).sum().item() - 1 for row in text]
    assert not out.text_token_mask[:, 0].any()
    assert lengths[0] > lengths[1] >= 2
    # the pooled text feature is the projected end-of-text token
    eot = text.argmax(dim=-1)
    torch.testing.assert_close(out.text_tokens[torch.arange(2), eot], out.text_features, atol=1e-6, rtol=0)


def test_open_clips_batch_first_block_holds_the_same_weights_and_computes_the_same(tiny_model):
    """conf/model/tiny.yaml and vit_b16_bert.yaml choose `block_type: custom` for speed: a model
    trained with torch's MultiheadAttention (or OpenAI's CLIP weights) must load into it strictly
    and give the same features, tokens included (FILIP), with the causal text mask."""
    arch = {
        "embed_dim": TINY_ARCH["embed_dim"],
        **{k: {**TINY_ARCH[k], "block_type": "custom"} for k in ("vision_cfg", "text_cfg")},
    }
    custom = build_model("flip-test-tiny-custom-block", arch).eval()
    block = custom.clip.visual.transformer.resblocks[0]
    assert not isinstance(block.attn, torch.nn.MultiheadAttention)  # the other block, not a no-op
    custom.load_state_dict(tiny_model.state_dict(), strict=True)
    images = torch.randn(3, 3, 32, 32)
    text = tiny_model.tokenize(["a person wearing a hat", "smiling", "a bald head with a beard"])
    with torch.no_grad():
        expected, got = tiny_model(images, text, return_tokens=True), custom(images, text, return_tokens=True)
    for name in ("image_features", "text_features", "image_tokens", "text_tokens"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=0)
    for config in ("tiny", "vit_b16_bert"):
        chosen = OmegaConf.load(CONF / "model" / f"{config}.yaml").arch
        assert chosen.vision_cfg.block_type == "custom", config


def test_logit_scale_and_bias_initialisation_come_from_the_model_config():
    model = build_model("flip-test-tiny", TINY_ARCH, init_logit_scale=2.302585, init_logit_bias=-10.0)
    assert model.logit_scale.item() == pytest.approx(2.302585)
    assert model.logit_bias.item() == pytest.approx(-10.0)


def test_unknown_model_name_lists_the_known_architectures():
    with pytest.raises(ValueError, match=r"unknown model.name 'ViT-Q-99'.*ViT-B-16"):
        build_model("ViT-Q-99")


def test_custom_architecture_must_have_towers_and_cannot_shadow_a_builtin():
    with pytest.raises(ValueError, match=r"lacks \['text_cfg'\]"):
        build_model("flip-broken", {"embed_dim": 8, "vision_cfg": {}})
    with pytest.raises(ValueError, match="built-in open_clip architecture"):
        build_model("ViT-B-16", TINY_ARCH)


def test_builtin_architecture_builds_offline_with_random_weights():
    model = build_model("RN50")  # no pretrained tag: nothing is downloaded
    assert model.preprocess.transforms[0].size == 224
    assert sum(p.numel() for p in model.parameters()) > 10_000_000


def test_filip_on_the_models_mask_equals_filip_dropping_the_start_token_of_the_padding_mask(tiny_model):
    """Moving the start-token rule from the loss config into the model changed no loss value."""
    from flip.losses import FilipLoss

    torch.manual_seed(3)
    images = torch.randn(4, 3, 32, 32)
    text = tiny_model.tokenize(["a red square", "a face", "a person with a hat", "blue"])
    with torch.no_grad():
        out = tiny_model(images, text, return_tokens=True)
    old_style = FilipLoss(exclude_sot=True)(
        out.image_tokens, out.text_tokens, out.logit_scale, text_token_mask=text != 0
    )
    now = FilipLoss().loss_from_outputs(out)
    assert torch.equal(old_style, now)
