"""Published models as baselines: each format written by the test in its exact layout, with random
weights, gives the reference implementation's embeddings; wrong files fail naming the keys."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
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
    with pytest.raises(
        ValueError, match=r"baseline.format=hf does not read baseline.pretrained; it takes path"
    ):
        load_baseline({"format": "hf", "path": "x", "pretrained": "openai"})
    with pytest.raises(ValueError, match=r"unknown baseline key\(s\) \['weights'\]"):
        BaselineSpec.from_mapping({"format": "farl", "weights": "x"})


# ---- Hugging Face CLIPModel / SiglipModel folders ---------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _tiny_clip_tokenizer(folder):
    """A CLIP BPE tokenizer over single letters (no merges): every lower-case word tokenizes."""
    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")


def _write_hf_folder(folder, kind: str) -> None:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )  # fmt: skip

    folder.mkdir()
    tokenizer = _tiny_clip_tokenizer(folder)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 20}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(3)
    if kind == "clip":
        text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_folder_gives_transformers_features_tokens_and_pixels(tmp_path, kind):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    folder = tmp_path / kind
    _write_hf_folder(folder, kind)
    model = load_baseline({"format": "hf", "path": str(folder)}).model
    reference = AutoModel.from_pretrained(folder).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    images = _images(32)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(torch.stack([model.preprocess(im) for im in images]), pixels)
    # CLIP's card pads to the longest caption with a mask; SigLIP's pads to max_length, unmasked
    padded = tokenizer(TEXTS, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    assert torch.equal(model.tokenize(TEXTS), padded["input_ids"])
    card = (
        tokenizer(TEXTS, padding=True, truncation=True, max_length=20, return_tensors="pt")
        if kind == "clip"
        else {"input_ids": padded["input_ids"]}
    )
    with torch.no_grad():
        image_ref = reference.get_image_features(pixel_values=pixels)
        text_ref = reference.get_text_features(**card)
    image_ref = image_ref if isinstance(image_ref, torch.Tensor) else image_ref.pooler_output
    text_ref = text_ref if isinstance(text_ref, torch.Tensor) else text_ref.pooler_output
    image, text = _embeddings(model, images)
    _close(image, F.normalize(image_ref, dim=-1))
    _close(text, F.normalize(text_ref, dim=-1))
    assert torch.equal(model.logit_scale, reference.logit_scale.view(()))
    assert (model.logit_bias is None) == (kind == "clip")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_folder_missing_tensors_fails_naming_them(tmp_path, kind):
    """transformers would fill the gaps with random weights and only warn: a baseline must not."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / kind
    _write_hf_folder(folder, kind)
    weights = load_file(folder / "model.safetensors")
    cut = sorted(k for k in weights if k.startswith("vision_model.post_layernorm."))
    assert len(cut) == 2
    save_file(
        {k: v for k, v in weights.items() if k not in cut}, folder / "model.safetensors", {"format": "pt"}
    )
    with pytest.raises(WeightsError, match=re.escape(f"2 missing ({', '.join(cut)})")):
        load_baseline({"format": "hf", "path": str(folder)})


def _openai_vocab_clip_folder(folder, hidden_act: str = "quick_gelu") -> None:
    """A tiny CLIPModel folder as Hugging Face saves OpenAI's: OpenAI's BPE vocabulary and merges
    (written from open_clip's copy), its processor settings, random weights."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder.mkdir()
    bpe = SimpleTokenizer()
    spelled = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({spelled.get(t, t): i for t, i in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 20, "hidden_act": hidden_act}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8, "hidden_act": hidden_act}  # fmt: skip
    torch.manual_seed(5)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    with torch.no_grad():  # biases and norms away from their 0/1 initialisation, so a mix-up shows
        for name, value in model.named_parameters():
            if name.endswith(("bias", "norm1.weight", "norm2.weight", "layernorm.weight", "layrnorm.weight")):
                value.add_(0.1 * torch.randn_like(value))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_flip_convert_writes_a_hf_clip_folder_as_open_clips_clip(tmp_path, hidden_act):
    """HF CLIPModel -> open_clip's OpenAI-layout CLIP: the same features on the same pixels and ids,
    through flip.load and through open_clip's local-dir: loader."""
    from transformers import AutoModel

    import flip
    from flip.cli.convert import main

    folder = tmp_path / "clip"
    _openai_vocab_clip_folder(folder, hidden_act)
    reference = AutoModel.from_pretrained(folder).eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = open_clip.get_tokenizer("ViT-B-32")(TEXTS, context_length=20)  # pads with 0 after end-of-text
    mask = (torch.arange(20) <= ids.argmax(-1, keepdim=True)).long()  # the tokens up to end-of-text
    hf_ids = load_baseline({"format": "hf", "path": str(folder)}).model.tokenize(TEXTS)
    assert torch.equal(hf_ids * mask, ids * mask)  # same BPE tokens; HF pads with end-of-text instead
    with torch.no_grad():
        image_ref = reference.get_image_features(pixel_values=pixels)
        text_ref = reference.get_text_features(input_ids=ids, attention_mask=mask)
    image_ref = image_ref if isinstance(image_ref, torch.Tensor) else image_ref.pooler_output
    text_ref = text_ref if isinstance(text_ref, torch.Tensor) else text_ref.pooler_output
    for to in ("flip", "open_clip"):
        out = tmp_path / to
        assert main(["--format", "hf", "--path", str(folder), "--to", to, "--out", str(out)]) == 0
        if to == "flip":
            model = flip.load(out)
            assert torch.equal(model.tokenize(TEXTS), ids)
        else:
            model = open_clip.create_model(f"local-dir:{out}").eval()
        with torch.no_grad():
            _close(model.encode_image(pixels), image_ref)
            _close(model.encode_text(ids), text_ref)
            _close(model.encode_text(hf_ids), text_ref)  # HF's end-of-text padding changes nothing
        assert torch.equal(model.logit_scale.detach(), reference.logit_scale.detach().view(()))


def test_a_clip_config_open_clip_cannot_express_is_refused_naming_it():
    from transformers import CLIPConfig

    from flip.models.baselines.hf_to_open_clip import HFConversionError, open_clip_arch

    base = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    cases = [  # (text config, vision config, how the error names it)
        ({"hidden_act": "gelu_new"}, {}, "hidden_act vision='quick_gelu' text='gelu_new'"),
        ({}, {"layer_norm_eps": 1e-6}, "vision layer_norm_eps=1e-06, not open_clip's 1e-05"),
        ({"eos_token_id": 7}, {}, "text vocab_size=49408, eos_token_id=7"),
        ({}, {"image_size": 30, "patch_size": 8}, "image_size=30 is no multiple of patch=8"),
    ]
    for text, vision, message in cases:
        config = CLIPConfig(text_config={**base, **text}, vision_config={**base, **vision})
        with pytest.raises(HFConversionError, match=re.escape(message)):
            open_clip_arch(config, "/models/x")
    arch = open_clip_arch(CLIPConfig(text_config=base, vision_config=base, projection_dim=24), "/models/x")
    assert arch["quick_gelu"] and arch["embed_dim"] == 24 and arch["vision_cfg"]["head_width"] == 16


def test_missing_hf_folder_or_bert_says_what_it_needs(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"neither a folder with a Hugging Face config.json nor a hub id"
    ):
        load_baseline({"format": "hf", "path": str(tmp_path / "nowhere")})
    bert = _bert_folder(tmp_path / "bert")
    _flip_base_checkpoint(tmp_path / "f.pth", bert)
    with pytest.raises(FileNotFoundError, match=r"text_model='.*no-bert' is neither a local folder"):
        load_baseline(
            {"format": "flip_base", "path": str(tmp_path / "f.pth"), "text_model": str(tmp_path / "no-bert")}
        )


def test_open_clip_names_local_dir_and_files_keep_working(tmp_path, tiny_model):
    from flip.export import export

    export(tiny_model, tmp_path / "oc", "open_clip")
    images = _images(32, n=2)
    expected = _embeddings(tiny_model, images)
    folder = load_baseline({"name": f"local-dir:{tmp_path / 'oc'}"}).model
    # open_clip's registry is per process and the last registration of a name wins: a test that
    # trained a variant under this name in the same worker (the demo's pooling) must not decide it
    register_architecture("flip-test-tiny", TINY_ARCH)
    weights = load_baseline(
        {"name": "flip-test-tiny", "pretrained": str(tmp_path / "oc" / "open_clip_model.safetensors")}
    )
    for model in (folder, weights.model):
        for ours, theirs in zip(_embeddings(model, images), expected, strict=True):
            _close(ours, theirs)


def test_open_clip_hf_hub_names_load_from_the_hub_cache_offline(tmp_path, tiny_model, monkeypatch):
    """`name=hf-hub:ORG/NAME` goes through open_clip's hub download; here the hub is a cache holding
    what open_clip's push_to_hf_hub uploads (our open_clip export), read with the hub offline."""
    import huggingface_hub.constants

    from flip.export import export

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--faces--flip-tiny"
    export(tiny_model, repo / "snapshots" / revision, "open_clip")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    torch.manual_seed(1)  # another random init than tiny_model's: only the loaded weights can agree
    model = load_baseline({"name": "hf-hub:faces/flip-tiny"}).model
    images = _images(32, n=2)
    for ours, theirs in zip(_embeddings(model, images), _embeddings(tiny_model, images), strict=True):
        _close(ours, theirs)
    with pytest.raises(FileNotFoundError, match=r"open_clip_config\.json\) for faces/no-such-model"):
        load_baseline({"name": "hf-hub:faces/no-such-model"})


# ---- FLIP-Base (BLIP layout) -------------------------------------------------------------------

FLIP_EMBED = 16


def _bert_folder(folder):
    """BERT-uncased's tokenizer and config, small: FLIP-Base's text_model, made locally."""
    from transformers import BertConfig, BertTokenizerFast

    from .helpers.bert import WORDS

    folder.mkdir()
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n"
    )
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=72, pad_token_id=0)  # fmt: skip
    config.save_pretrained(folder)
    return config


def _tiny_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    # two heads of 64, as every CLIP ViT splits its width (ViT-B/16: 12 x 64)
    sizes = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPVisionConfig(**sizes, image_size=32, patch_size=16, hidden_act="quick_gelu")
    return CLIPVisionModel(config)


def _flip_base_checkpoint(path, bert) -> dict[str, torch.Tensor]:
    """FLIP-Base's saved dict ({"model": ..., "optimizer": ..., "config": ..., "epoch": ...}) with
    its exact key names: HF CLIP vision encoder, BLIP's BERT (no token types, cross-attention),
    projections with bias, ITM head, momentum copies, queues and `temp`."""
    from transformers import BertModel

    torch.manual_seed(4)
    vision = _tiny_vision()
    # FLIP's VisionModel nests the encoder as `vision_model` and spells its final norm `post_layrnorm`
    state = {f"visual_encoder.vision_model.{k.replace('post_layernorm', 'post_layrnorm')}": v
             for k, v in vision.state_dict().items()}  # fmt: skip
    state["visual_encoder.vision_model.embeddings.position_ids"] = torch.arange(5).expand(1, -1)
    text = {}
    for key, value in BertModel(bert, add_pooling_layer=False).state_dict().items():
        if "token_type" in key:
            continue
        text[key] = value + 0.02 * torch.randn_like(value) if value.is_floating_point() else value
        if ".attention." in key:  # BLIP's layers: a cross-attention block beside the self-attention
            text[key.replace(".attention.", ".crossattention.")] = torch.randn_like(value)
    words = text["embeddings.word_embeddings.weight"]
    text["embeddings.word_embeddings.weight"] = torch.cat(
        [words, torch.randn(2, words.shape[1])]
    )  # [DEC], [ENC]
    text["embeddings.position_ids"] = torch.arange(72).expand(1, -1)
    state.update({f"text_encoder.{k}": v for k, v in text.items()})
    for name, width in (("vision_proj", 128), ("text_proj", 32)):
        layer = torch.nn.Linear(width, FLIP_EMBED)
        torch.nn.init.normal_(layer.bias, std=0.5)
        state.update({f"{name}.weight": layer.weight.data, f"{name}.bias": layer.bias.data})
    state.update({"itm_head.weight": torch.randn(2, 32), "itm_head.bias": torch.zeros(2)})
    for key in [
        k for k in state if k.startswith(("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj."))
    ]:
        head, rest = key.split(".", 1)
        state[f"{head}_m.{rest}"] = state[key].clone()
    state.update({"image_queue": torch.randn(FLIP_EMBED, 8), "text_queue": torch.randn(FLIP_EMBED, 8),
                  "idx_queue": torch.full((1, 8), -100), "ptr_queue": torch.zeros(1, dtype=torch.long),
                  "temp": torch.tensor(0.07)})  # fmt: skip
    torch.save(
        {
            "model": state,
            "optimizer": {"state": {}, "param_groups": []},
            "config": {"vit": "base"},
            "epoch": 14,
        },
        path,
    )
    return state


def _flip_itc_reference(state, bert, folder, images):
    """FLIP's ITC path re-implemented from its code (models/fflip_pretrain.py, models/mm.py)."""
    from torchvision import transforms
    from transformers import BertTokenizerFast

    # image: Resize((224, 224), bicubic) (here the checkpoint's 32), ToTensor, OpenAI's normalisation
    transform = transforms.Compose([
        transforms.Resize((32, 32), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])  # fmt: skip
    pixels = torch.stack([transform(im.convert("RGB")) for im in images])
    vision = _tiny_vision()
    prefix = "visual_encoder.vision_model."
    kept = {k: v for k, v in state.items() if k.startswith(prefix) and "position_ids" not in k}
    vision.load_state_dict(
        {k[len(prefix) :].replace("post_layrnorm", "post_layernorm"): v for k, v in kept.items()}
    )
    s = state
    with torch.no_grad():
        cls = vision(pixel_values=pixels).pooler_output  # post_layrnorm(last_hidden_state)[:, 0]
        image = F.normalize(cls @ s["vision_proj.weight"].T + s["vision_proj.bias"], dim=-1)
        # text: BertTokenizer(padding="max_length", truncation=True, max_length=65); BLIP's BERT, mode="text"
        tok = BertTokenizerFast.from_pretrained(folder)(
            TEXTS, padding="max_length", truncation=True, max_length=65, return_tensors="pt"
        )
        ids, mask = tok["input_ids"], tok["attention_mask"]
        p = "text_encoder."
        ln = lambda x, n: F.layer_norm(x, (32,), s[n + ".weight"], s[n + ".bias"], eps=1e-12)  # noqa: E731
        lin = lambda x, n: x @ s[n + ".weight"].T + s[n + ".bias"]  # noqa: E731
        x = ln(
            s[p + "embeddings.word_embeddings.weight"][ids]
            + s[p + "embeddings.position_embeddings.weight"][: ids.shape[1]],
            p + "embeddings.LayerNorm",
        )
        additive = (1.0 - mask[:, None, None, :].float()) * -10000.0
        for i in range(bert.num_hidden_layers):
            q_ = f"{p}encoder.layer.{i}."
            heads = lambda t: t.view(t.shape[0], t.shape[1], 2, 16).transpose(1, 2)  # noqa: E731
            q, k, v = (heads(lin(x, q_ + f"attention.self.{n}")) for n in ("query", "key", "value"))
            attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16) + additive, dim=-1)
            context = (attention @ v).transpose(1, 2).reshape(x.shape)
            x = ln(lin(context, q_ + "attention.output.dense") + x, q_ + "attention.output.LayerNorm")
            hidden = F.gelu(lin(x, q_ + "intermediate.dense"))
            x = ln(lin(hidden, q_ + "output.dense") + x, q_ + "output.LayerNorm")
        text = F.normalize(lin(x[:, 0], "text_proj"), dim=-1)
    return pixels, ids, image, text


def test_flip_base_checkpoint_gives_its_itc_embeddings_and_names_what_it_ignores(tmp_path):
    bert = _bert_folder(tmp_path / "bert")
    path = tmp_path / "FLIP-Base.pth"
    state = _flip_base_checkpoint(path, bert)
    loaded = load_baseline({"format": "flip_base", "path": str(path), "text_model": str(tmp_path / "bert")})
    model = loaded.model
    images = _images(32)
    pixels, ids, image_ref, text_ref = _flip_itc_reference(state, bert, tmp_path / "bert", images)
    assert torch.equal(torch.stack([model.preprocess(im) for im in images]), pixels)
    assert torch.equal(model.tokenize(TEXTS), ids)
    image, text = _embeddings(model, images)
    _close(image, image_ref)
    _close(text, text_ref)
    assert math.isclose(float(model.logit_scale.detach().exp()), 1 / 0.07, rel_tol=1e-6)
    ignored = set(loaded.ignored)
    assert "temp" not in ignored
    assert {"itm_head.weight", "image_queue", "ptr_queue", "vision_proj_m.bias",
            "text_encoder.encoder.layer.1.crossattention.self.query.weight",
            "text_encoder_m.embeddings.word_embeddings.weight"} <= ignored  # fmt: skip
    assert "text_encoder.embeddings.word_embeddings.weight[17:] (2 added tokens)" in ignored
    used = {
        k
        for k in state
        if not k.startswith(("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m."))
    }
    assert not any(
        k in ignored
        for k in used
        if k.startswith(("vision_proj.", "text_proj.", "visual_encoder.vision_model.encoder"))
    )


def test_truncated_flip_base_checkpoint_fails_naming_the_missing_keys(tmp_path):
    bert = _bert_folder(tmp_path / "bert")
    path = tmp_path / "FLIP-Base.pth"
    full = _flip_base_checkpoint(path, bert)
    spec = {"format": "flip_base", "path": str(path), "text_model": str(tmp_path / "bert")}
    vision = "visual_encoder.vision_model."
    cases = {  # the tensor cut from the file -> how the error names it
        "text_encoder.encoder.layer.1.output.dense.weight": "1 missing key(s): {}",
        f"{vision}encoder.layers.1.mlp.fc2.bias": "1 missing key(s): {}",
        f"{vision}post_layrnorm.weight": "1 missing key(s): {}",
        f"{vision}encoder.layers.0.self_attn.k_proj.weight": "lacks ['{}']",
        "text_proj.bias": "lacks '{}'",
    }
    for cut, message in cases.items():
        torch.save({"model": {k: v for k, v in full.items() if k != cut}}, path)
        with pytest.raises(WeightsError, match=re.escape(message.format(cut))):
            load_baseline(spec)
    torch.save({"model": {**full, f"{vision}adapter.weight": torch.zeros(1)}}, path)
    with pytest.raises(
        WeightsError, match=r"tensors FLIP-Base does not: \['visual_encoder\.vision_model\.adapter\.weight'\]"
    ):
        load_baseline(spec)


# ---- one syntax: flip-convert, the eval scripts, flip-query -----------------------------------


def test_flip_convert_round_trips_through_flip_load(tmp_path, quickgelu_tiny):
    import flip
    from flip.cli.convert import main

    clip = quickgelu_tiny[0]
    weights = tmp_path / "farl.pth"
    _openai_layout_file(weights, clip)
    bert = _bert_folder(tmp_path / "bert")
    flip_base = tmp_path / "FLIP-Base.pth"
    _flip_base_checkpoint(flip_base, bert)
    images = _images(32)
    specs = {
        "farl": ["--format", "farl", "--name", QUICKGELU_TINY, "--path", str(weights)],
        "flip_base": [
            "--format",
            "flip_base",
            "--path",
            str(flip_base),
            "--text-model",
            str(tmp_path / "bert"),
        ],
    }
    for label, args in specs.items():
        spec = dict(zip([a[2:].replace("-", "_") for a in args[::2]], args[1::2], strict=True))
        expected = _embeddings(load_baseline(spec).model, images)
        targets = ["flip", "open_clip"] if label == "farl" else ["flip"]
        for to in targets:
            out = tmp_path / f"{label}_{to}"
            assert main([*args, "--to", to, "--out", str(out)]) == 0
            for ours, theirs in zip(_embeddings(flip.load(out), images), expected, strict=True):
                _close(ours, theirs)


def test_flip_convert_refuses_what_a_format_cannot_hold(tmp_path, capsys):
    from flip.cli.convert import main

    _write_hf_folder(tmp_path / "siglip", "siglip")
    _write_hf_folder(tmp_path / "letters", "clip")  # a CLIP whose vocabulary is not OpenAI's
    refusals = {
        "siglip": "it is a 'siglip' model; open_clip's SigLIP towers are timm/big_vision-based",
        "letters": "text vocab_size=54, eos_token_id=1; the converted model uses open_clip's OpenAI",
    }
    for name, message in refusals.items():
        out = tmp_path / "o"
        args = ["--format", "hf", "--path", str(tmp_path / name), "--to", "open_clip", "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and f"baseline.format=hf baseline.path={tmp_path / name}" in err
        assert not out.exists()
    bert = _bert_folder(tmp_path / "bert")
    _flip_base_checkpoint(tmp_path / "f.pth", bert)
    args = [
        "--format",
        "flip_base",
        "--path",
        str(tmp_path / "f.pth"),
        "--text-model",
        str(tmp_path / "bert"),
    ]
    assert main([*args, "--to", "open_clip", "--out", str(tmp_path / "o")]) == 2
    assert "has a Hugging Face text tower" in capsys.readouterr().err


def test_eval_scripts_and_flip_query_load_a_baseline_by_the_same_keys(tmp_path, quickgelu_tiny, capsys):
    from omegaconf import OmegaConf

    from flip.cli.evaluate import load_eval_model
    from flip.cli.query import main as query

    weights = tmp_path / "farl.pth"
    _openai_layout_file(weights, quickgelu_tiny[0])
    baseline = {"format": "farl", "name": QUICKGELU_TINY, "path": str(weights)}
    cfg = OmegaConf.create({"ckpt": None, "device": "cpu", "baseline": baseline})
    model, identity, name = load_eval_model(cfg)
    assert name == f"farl:{weights}" and str(weights) in identity
    images = _images(32, n=1)
    _close(_embeddings(model, images)[0], _embeddings(load_baseline(baseline).model, images)[0])
    with pytest.raises(ValueError, match="give either ckpt="):
        load_eval_model(OmegaConf.create({"ckpt": "x.ckpt", "device": "cpu", "baseline": baseline}))
    images[0].save(tmp_path / "face.png")
    args = ["--format", "farl", "--name", QUICKGELU_TINY, "--path", str(weights), "--device", "cpu"]
    assert query([*args, "--workers", "0", "--choices", "red", "blue", "--", str(tmp_path / "face.png")]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert record["answer"] in ("red", "blue") and set(record["probabilities"]) == {"red", "blue"}


def test_eval_scripts_run_on_baselines_and_on_their_conversion_alike(tmp_path, folder_benchmark):
    """The eval path takes a baseline as it takes a checkpoint: FLIP-Base through baseline.* and
    through its flip-convert output gives the same zero-shot decisions; a SigLIP folder runs too."""
    from flip.cli.convert import convert
    from flip.cli.evaluate import run

    from .helpers import compose_eval, eval_overrides

    bert = _bert_folder(tmp_path / "bert")
    _flip_base_checkpoint(tmp_path / "f.pth", bert)
    _write_hf_folder(tmp_path / "siglip", "siglip")
    spec = {"format": "flip_base", "path": str(tmp_path / "f.pth"), "text_model": str(tmp_path / "bert")}
    convert(spec, "flip", str(tmp_path / "converted"))
    runs = {
        "baseline": ["ckpt=null", *(f"baseline.{k}={v}" for k, v in spec.items())],
        "converted": [f"ckpt={tmp_path / 'converted'}"],
        "siglip": ["ckpt=null", "baseline.format=hf", f"baseline.path={tmp_path / 'siglip'}"],
    }
    written = {}
    for label, model in runs.items():
        overrides = eval_overrides(tmp_path, "x", "folder", folder_benchmark, out=label)[1:]
        run(compose_eval("eval_zeroshot", tmp_path, *overrides, *model))
        written[label] = json.loads((tmp_path / label / "metrics.json").read_text())
    assert written["baseline"]["checkpoint"] == f"flip_base:{tmp_path / 'f.pth'}"
    assert (
        written["siglip"]["checkpoint"] == f"hf:{tmp_path / 'siglip'}" and written["siglip"]["n_test"] == 12
    )
    for key in ("summary", "confusion_matrix", "per_label"):
        assert written["baseline"][key] == written["converted"][key]
