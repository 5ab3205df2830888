"""Published models as baselines: each format written by the test in its exact layout, with random
weights, gives the reference implementation's embeddings; wrong files fail naming the keys."""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from flip.models import register_architecture
from flip.models.baselines import BaselineSpec, WeightsError, load_baseline

from .helpers.configs import TINY_ARCH

TEXTS = ["a face with a red hat", "the person", "", "a blue square face " * 30]
TOL = 1e-5


def _images(size: int, n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    shapes = [(size + 7, size + 3), (size * 2, size), (size, size)][:n]
    return [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL


def _embeddings(model, images: list[Image.Image], texts=TEXTS) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        pixels = torch.stack([model.preprocess(im) for im in images])
        return model.encode_image(pixels, normalize=True), model.encode_text(
            model.tokenize(texts), normalize=True
        )


# ---- OpenAI / open_clip layout, FaRL ----------------------------------------------------------


QUICKGELU_TINY = "flip-test-tiny-quickgelu"


def _openai_layout_file(
    path, reference: torch.nn.Module, extra: dict | None = None, prefix: str = ""
) -> None:
    """As FaRL saves it: {"state_dict": OpenAI CLIP keys (+ extras)}, optionally DDP-prefixed."""
    state = {prefix + k: v.clone() for k, v in reference.state_dict().items()}
    state.update(extra or {})
    torch.save({"state_dict": state, "epoch": 16}, path)


@pytest.fixture
def quickgelu_tiny():
    register_architecture(QUICKGELU_TINY, {**copy.deepcopy(TINY_ARCH), "quick_gelu": True})
    torch.manual_seed(1)
    clip, _, preprocess = open_clip.create_model_and_transforms(QUICKGELU_TINY)
    return clip.eval(), preprocess, open_clip.get_tokenizer(QUICKGELU_TINY)


def _reference_embeddings(clip, preprocess, tokenizer, images):
    with torch.no_grad():
        pixels = torch.stack([preprocess(im) for im in images])
        return clip.encode_image(pixels, normalize=True), clip.encode_text(tokenizer(TEXTS), normalize=True)


def test_openai_layout_file_gives_open_clips_embeddings(tmp_path, quickgelu_tiny):
    clip, preprocess, tokenizer = quickgelu_tiny
    path = tmp_path / "openai_layout.pth"
    extra = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(24)}
    _openai_layout_file(path, clip, extra, prefix="module.")
    loaded = load_baseline({"name": QUICKGELU_TINY, "pretrained": str(path)})
    assert loaded.spec.format == "open_clip"
    assert loaded.ignored == ["context_length", "input_resolution"]
    images = _images(32)
    for ours, theirs in zip(
        _embeddings(loaded.model, images),
        _reference_embeddings(clip, preprocess, tokenizer, images),
        strict=True,
    ):
        _close(ours, theirs)


def test_farl_checkpoint_in_its_real_layout_gives_open_clips_vit_b16_quickgelu(tmp_path):
    torch.manual_seed(2)
    clip, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16-quickgelu")
    path = tmp_path / "FaRL-Base-Patch16-LAIONFace20M-ep64.pth"
    _openai_layout_file(path, clip.eval())
    loaded = load_baseline({"format": "farl", "path": str(path)})
    assert loaded.ignored == []
    images = _images(224, n=2)
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    for ours, theirs in zip(
        _embeddings(loaded.model, images),
        _reference_embeddings(clip, preprocess, tokenizer, images),
        strict=True,
    ):
        _close(ours, theirs)


def test_truncated_or_wrong_openai_layout_file_fails_naming_the_keys(tmp_path, quickgelu_tiny):
    clip = quickgelu_tiny[0]
    state = clip.state_dict()
    truncated = tmp_path / "truncated.pth"
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "ln_final.weight"}}, truncated)
    with pytest.raises(WeightsError, match=r"1 missing key\(s\): ln_final\.weight"):
        load_baseline({"format": "farl", "name": QUICKGELU_TINY, "path": str(truncated)})
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": {"vision_proj.weight": torch.zeros(2, 2)}}, wrong)
    with pytest.raises(WeightsError, match=r"missing key\(s\): .*unexpected key\(s\): vision_proj\.weight"):
        load_baseline({"format": "farl", "name": QUICKGELU_TINY, "path": str(wrong)})
    cut = tmp_path / "cut.pth"
    torch.save({"state_dict": state}, cut)
    cut.write_bytes(cut.read_bytes()[:2000])
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        load_baseline({"format": "farl", "name": QUICKGELU_TINY, "path": str(cut)})


class Payload:
    def __reduce__(self):
        return (print, ("ran",))


def test_a_pickle_with_code_is_refused_unrun(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(WeightsError, match="refused"):
        load_baseline({"format": "farl", "path": str(path)})
    assert "ran" not in capsys.readouterr().out


def test_unknown_format_or_missing_field_names_the_accepted_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown baseline.format='blip'; known formats: open_clip: .*farl: .*hf: .*flip_base",
    ):
        load_baseline({"format": "blip", "path": "x"})
    with pytest.raises(ValueError, match=r"baseline.format=farl needs baseline.path"):
        load_baseline({"format": "farl"})
    with pytest.raises(ValueError, match=r"unknown baseline key\(s\) \['weights'\]"):
        BaselineSpec.from_mapping({"format": "farl", "weights": "x"})
