"""A Hugging Face `CLIPModel` rewritten as open_clip's `CLIP` in the OpenAI layout, for flip-convert.

open_clip ships no such conversion (its `convert.py` handles big_vision and MobileCLIP only), so it
is done here, tensor by tensor: HF's separate q/k/v projections are concatenated into
`in_proj_weight`/`in_proj_bias` (open_clip's `nn.MultiheadAttention`), `layer_norm1/2` become
`ln_1/2`, `mlp.fc1/fc2` `mlp.c_fc/c_proj`, `pre_layrnorm`/`post_layernorm` `ln_pre`/`ln_post`,
and the bias-free `visual_projection`/`text_projection` Linear layers are stored transposed
(`visual.proj`, `text_projection`: x @ P). The architecture is built from the HF config.

The two compute the same function: HF's text tower pools the first end-of-text token
(`eos_token_id` 49407, or the arg-max id for configs with the legacy `eos_token_id` 2) and
open_clip's pools the arg-max id, which is end-of-text (49407, the largest id) in open_clip's
tokenizer output; both towers are causal, so what follows that token (HF pads with end-of-text,
open_clip with 0) never reaches it. What changes is the input: the converted model tokenizes
with open_clip's OpenAI BPE tokenizer (checked to be the folder's vocabulary) and preprocesses
with open_clip's transform (torchvision bicubic resize of the short side and centre crop,
OpenAI's mean/std, checked to be the processor's), not the HF processor's own resize code, so
its pixels, and therefore its embeddings, can differ slightly from `baseline.format=hf` on the
same image file.

Refused, naming the value: SigLIP (open_clip's SigLIP towers are timm/big_vision-based, another
layout), activations other than quick_gelu/gelu or different per tower, LayerNorm eps other than
open_clip's 1e-5, a vocabulary other than OpenAI's, a processor with other mean/std or that resizes to
another size than it crops, and any tensor the mapping does not place.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer

from flip.models.baselines.openai_layout import build_unloaded
from flip.models.baselines.weights import WeightsError, check_keys
from flip.models.flip_model import FlipModel

ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # HF hidden_act -> open_clip quick_gelu
OPENAI_EOT = 49407
LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm


class HFConversionError(ValueError):
    """A Hugging Face model that open_clip's OpenAI-layout CLIP cannot express; the message says what."""


def _block(hf: str, oc: str) -> dict[str, tuple[str, ...]]:
    """open_clip key -> the HF keys it is made of, for one residual block."""
    attn = f"{hf}self_attn."
    keys = {f"{oc}attn.in_proj_{p}": tuple(f"{attn}{n}_proj.{p}" for n in "qkv") for p in ("weight", "bias")}
    for o, h in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):  # fmt: skip
        keys.update({f"{oc}{o}.{p}": (f"{hf}{h}.{p}",) for p in ("weight", "bias")})
    return keys


def key_map(vision_layers: int, text_layers: int) -> dict[str, tuple[str, ...]]:
    """Every open_clip CLIP key and the HF CLIPModel keys it comes from."""
    v, t = "vision_model.", "text_model."
    keys = {
        "visual.class_embedding": (f"{v}embeddings.class_embedding",),
        "visual.positional_embedding": (f"{v}embeddings.position_embedding.weight",),
        "visual.conv1.weight": (f"{v}embeddings.patch_embedding.weight",),
        "visual.proj": ("visual_projection.weight",),
        "token_embedding.weight": (f"{t}embeddings.token_embedding.weight",),
        "positional_embedding": (f"{t}embeddings.position_embedding.weight",),
        "text_projection": ("text_projection.weight",),
        "logit_scale": ("logit_scale",),
    }
    for o, h in (("visual.ln_pre", f"{v}pre_layrnorm"), ("visual.ln_post", f"{v}post_layernorm"),
                 ("ln_final", f"{t}final_layer_norm")):  # fmt: skip
        keys.update({f"{o}.{p}": (f"{h}.{p}",) for p in ("weight", "bias")})
    for i in range(vision_layers):
        keys.update(_block(f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."))
    for i in range(text_layers):
        keys.update(_block(f"{t}encoder.layers.{i}.", f"transformer.resblocks.{i}."))
    return keys


def _refuse(source: str, problem: str) -> HFConversionError:
    return HFConversionError(
        f"{source!r} cannot be written as open_clip's OpenAI-layout CLIP: {problem}. Evaluate the folder "
        f"as it is: baseline.format=hf baseline.path={source}"
    )


def _ratio(source: str, tower: str, cfg: Any) -> float:
    ratio = cfg.intermediate_size / cfg.hidden_size
    if int(cfg.hidden_size * ratio) != cfg.intermediate_size:
        raise _refuse(source, f"{tower} intermediate_size={cfg.intermediate_size} is not a width x mlp_ratio")
    return ratio


def open_clip_arch(config: Any, source: str) -> dict[str, Any]:
    """open_clip's architecture (model_cfg) for a `CLIPConfig`; refuses what it cannot express."""
    if config.model_type != "clip":
        raise _refuse(
            source,
            f"it is a {config.model_type!r} model; open_clip's SigLIP towers are timm/big_vision-based, "
            "with another parameter layout, and only CLIPModel folders are mapped",
        )
    vision, text = config.vision_config, config.text_config
    acts = {vision.hidden_act, text.hidden_act}
    if len(acts) != 1 or not acts <= set(ACTIVATIONS):
        raise _refuse(
            source,
            f"hidden_act vision={vision.hidden_act!r} text={text.hidden_act!r}; open_clip has one activation "
            f"for both towers, one of {sorted(ACTIVATIONS)}",
        )
    for tower, cfg in (("vision", vision), ("text", text)):
        if cfg.layer_norm_eps != LAYER_NORM_EPS:
            eps = cfg.layer_norm_eps
            raise _refuse(source, f"{tower} layer_norm_eps={eps}, not open_clip's {LAYER_NORM_EPS}")
    if vision.hidden_size % vision.num_attention_heads or vision.num_channels != 3:
        raise _refuse(source, f"vision {vision.num_attention_heads} heads over width {vision.hidden_size}, "
                              f"{vision.num_channels} channels")  # fmt: skip
    if vision.image_size % vision.patch_size:
        raise _refuse(source, f"image_size={vision.image_size} is no multiple of patch={vision.patch_size}")
    if text.vocab_size != OPENAI_EOT + 1 or text.eos_token_id not in (2, OPENAI_EOT):
        raise _refuse(
            source,
            f"text vocab_size={text.vocab_size}, eos_token_id={text.eos_token_id}; the converted model uses "
            f"open_clip's OpenAI tokenizer (vocab_size {OPENAI_EOT + 1}, end-of-text {OPENAI_EOT})",
        )
    return {
        "embed_dim": int(config.projection_dim),
        "quick_gelu": ACTIVATIONS[vision.hidden_act],
        "vision_cfg": {"image_size": vision.image_size, "patch_size": vision.patch_size,
                       "width": vision.hidden_size, "layers": vision.num_hidden_layers,
                       "head_width": vision.hidden_size // vision.num_attention_heads,
                       "mlp_ratio": _ratio(source, "vision", vision)},
        "text_cfg": {"context_length": text.max_position_embeddings, "vocab_size": text.vocab_size,
                     "width": text.hidden_size, "heads": text.num_attention_heads,
                     "layers": text.num_hidden_layers, "mlp_ratio": _ratio(source, "text", text)},
    }  # fmt: skip


def _check_tokenizer(tokenizer: Any, source: str) -> None:
    """The folder's tokenizer must have OpenAI's vocabulary, else open_clip's ids mean other tokens."""
    # open_clip spells OpenAI's two special tokens its own way; the ids are the same
    spelled = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    ours = {spelled.get(token, token): i for token, i in SimpleTokenizer().encoder.items()}
    theirs = tokenizer.get_vocab()
    if theirs != ours:
        differ = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])[:3]
        raise _refuse(
            source,
            f"its tokenizer's vocabulary ({len(theirs)} tokens) is not OpenAI CLIP's BPE vocabulary "
            f"({len(ours)} tokens; first differences {differ}), which open_clip's tokenizer uses",
        )


def _check_processor(processor: Any, image_size: int, source: str) -> None:
    """open_clip's transform for this architecture: OpenAI's mean/std, short side resized to the crop."""
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    short, sides = size.get("shortest_edge"), {crop.get("height"), crop.get("width")}
    if short != image_size or sides != {image_size}:
        raise _refuse(
            source,
            f"its image processor resizes to size={dict(size)} and crops crop_size={dict(crop)}; open_clip's "
            f"transform resizes the short side to the crop size, the image_size {image_size}",
        )
    stats = {"image_mean": OPENAI_DATASET_MEAN, "image_std": OPENAI_DATASET_STD}
    for name, expected in stats.items():
        given = tuple(float(x) for x in getattr(processor, name))
        if not all(abs(a - b) < 1e-6 for a, b in zip(given, expected, strict=True)):
            raise _refuse(source, f"its image processor's {name}={list(given)} is not OpenAI's "
                                  f"{list(expected)}, which open_clip's transform uses")  # fmt: skip


def _arch_name(source: str) -> str:
    return "hf-clip-" + re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).name or "model")


def hf_clip_to_open_clip(hf_model: Any, tokenizer: Any, processor: Any, source: str) -> FlipModel:
    """The FLIP model (open_clip towers, tokenizer, transform) equal to HF `CLIPModel` `hf_model`."""
    arch = open_clip_arch(hf_model.config, source)
    _check_tokenizer(tokenizer, source)
    _check_processor(processor, arch["vision_cfg"]["image_size"], source)
    state = {k: v for k, v in hf_model.state_dict().items() if not k.endswith("position_ids")}
    keys = key_map(arch["vision_cfg"]["layers"], arch["text_cfg"]["layers"])
    used = {h: state[h].shape for parts in keys.values() for h in parts if h in state}
    missing = {h: () for parts in keys.values() for h in parts if h not in state}
    try:
        check_keys({**used, **missing}, state, source, "a CLIPModel open_clip can express", False)
    except WeightsError as err:
        raise _refuse(source, str(err)) from None
    converted = {}
    for oc, parts in keys.items():
        tensors = [state[h] for h in parts]
        value = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        converted[oc] = value.T if oc in ("visual.proj", "text_projection") else value
    model = build_unloaded(_arch_name(source), arch=arch)
    model.clip.load_state_dict({k: v.contiguous() for k, v in converted.items()}, strict=True)
    return model.eval()
