"""FLIP-Base, the FaceCaption-15M model (github.com/ddw2AIGROUP2CQUPT/FLIP), mapped onto FLIP's towers.

Its released checkpoint is BLIP's layout: `{"model": state_dict, ...}` with a CLIP ViT image
encoder in Hugging Face's naming (`visual_encoder.vision_model.*`, QuickGELU), a BERT text
encoder without token-type embeddings (`text_encoder.*`, plus cross-attention layers), 256-d
`vision_proj`/`text_proj` (linear layers with bias) and the temperature `temp`. Its contrastive
(ITC) path is: image -> encoder -> post-LayerNorm -> `vision_proj` of the [CLS] token; text
(BERT-uncased tokens, padded to 65, [CLS] first) -> BERT without cross-attention ->
`text_proj` of [CLS]; both L2-normalised. Images are resized to 224x224 without cropping
(bicubic) and normalised with OpenAI's mean and std.

That path is an open_clip ViT-B/16 (QuickGELU) beside open_clip's Hugging Face BERT tower with
[CLS] pooling and a linear projection, which FLIP trains itself (conf/model/vit_b16_bert.yaml),
except for the projections' biases: open_clip's projections have none. A bias `b` after a
projection `W` of a LayerNorm's output is the same as adding `d` with `W d = b` to that
LayerNorm's bias, and `d` exists because `W` (256 x 768) has full row rank; the mapping solves
for it and checks the result reproduces the bias. The BERT tower takes its config and tokenizer
from `text_model` (`bert-base-uncased`, a hub id or a local copy): FLIP's two extra tokens
([DEC], [ENC]; used by its decoder and ITM head, never produced for a caption) are dropped from
the word embeddings. Everything used only by the ITM head, the cross-attention or the momentum
encoders and queues is reported as ignored, by name.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from flip.models.baselines.openai_layout import build_unloaded
from flip.models.baselines.weights import (
    WeightsError,
    check_keys,
    read_weights,
    report_ignored,
    state_dict_of,
)
from flip.models.flip_model import FlipModel

WHAT = "a FLIP-Base checkpoint (BLIP layout: visual_encoder.*, text_encoder.*, vision_proj, text_proj, temp)"
VISION = "visual_encoder.vision_model."
TEXT = "text_encoder."
CONTEXT_LENGTH = 65  # FLIP's pretraining tokenizer call: padding="max_length", max_length=65
HEAD_WIDTH = 64  # CLIP ViTs' attention head width (ViT-B/16: 768 = 12 x 64)
# tensors of the checkpoint that the contrastive path never reads
IGNORED = re.compile(
    r"^(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m|itm_head)\.|"
    r"^(image_queue|text_queue|idx_queue|ptr_queue)$|"
    r"\.crossattention\.|position_ids$|^text_encoder\.pooler\."
)
VISION_RENAMES = (
    ("embeddings.class_embedding", "class_embedding"),
    ("embeddings.patch_embedding.weight", "conv1.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("pre_layrnorm.", "ln_pre."),
    ("post_layrnorm.", "ln_post."),  # FLIP's spelling (models/mm.py)
    ("post_layernorm.", "ln_post."),  # transformers' CLIPVisionTransformer's
)
BLOCK_RENAMES = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
FOLD_TOLERANCE = 1e-4


def architecture(state: dict[str, torch.Tensor], text_model: str) -> dict[str, Any]:
    """The open_clip architecture of the checkpoint's towers, read off its tensor shapes."""
    try:
        patch = state[f"{VISION}embeddings.patch_embedding.weight"]
        positions = state[f"{VISION}embeddings.position_embedding.weight"].shape[0]
        embed_dim = state["vision_proj.weight"].shape[0]
        mlp = state[f"{VISION}encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise WeightsError(f"the checkpoint lacks {err.args[0]!r}: it is not {WHAT}") from None
    width, patch_size = patch.shape[0], patch.shape[-1]
    layers = len({k.split(".")[4] for k in state if k.startswith(f"{VISION}encoder.layers.")})
    return {
        "embed_dim": int(embed_dim),
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": int(math.isqrt(positions - 1) * patch_size),
            "layers": layers,
            "width": int(width),
            "head_width": HEAD_WIDTH,
            "mlp_ratio": mlp / width,
            "patch_size": int(patch_size),
        },
        "text_cfg": {
            "hf_model_name": text_model,
            "hf_tokenizer_name": text_model,
            "hf_model_pretrained": False,
            "hf_pooler_type": "cls",
            "hf_proj_type": "linear",
            "context_length": CONTEXT_LENGTH,
        },
    }


def fold_bias(weight: torch.Tensor, bias: torch.Tensor, name: str) -> torch.Tensor:
    """`d` with `weight @ d == bias`: a projection's bias moved into the LayerNorm before it."""
    w, b = weight.double(), bias.double()
    shift = torch.linalg.lstsq(w, b.unsqueeze(-1)).solution.squeeze(-1)
    error = (w @ shift - b).abs().max().item()
    if error > FOLD_TOLERANCE * max(1.0, b.abs().max().item()):
        raise WeightsError(
            f"{name}: its bias cannot be moved before the projection (the projection is rank-deficient, "
            f"residual {error:.1e}); this checkpoint does not map onto open_clip's bias-free projections"
        )
    return shift


def _vision_state(state: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """open_clip's names for the image tower's tensors, and the file's tensors no rule maps."""
    out, unmapped, qkv = {}, [], {}
    for key, value in state.items():
        if not key.startswith(VISION) or IGNORED.search(key):
            continue
        rest = key[len(VISION) :]
        block = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", rest)
        renames, prefix = (BLOCK_RENAMES, f"visual.transformer.resblocks.{block[1]}.") if block else (
            VISION_RENAMES, "visual.")  # fmt: skip
        rest = block[2] if block else rest
        split = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest) if block else None
        if split:  # q, k and v are one in_proj matrix in torch's MultiheadAttention
            qkv.setdefault((block[1], split[2]), {})[split[1]] = value
            continue
        new = next((new + rest[len(old) :] for old, new in renames if rest.startswith(old)), None)
        if new is None:
            unmapped.append(key)
        else:
            out[prefix + new] = value
    for (layer, part), parts in qkv.items():
        absent = [
            f"{VISION}encoder.layers.{layer}.self_attn.{p}_proj.{part}" for p in "qkv" if p not in parts
        ]
        if absent:
            raise WeightsError(f"{source!r} lacks {absent}: it is not {WHAT}")
        out[f"visual.transformer.resblocks.{layer}.attn.in_proj_{part}"] = torch.cat(
            [parts[p] for p in "qkv"]
        )
    weight, bias = state["vision_proj.weight"], state["vision_proj.bias"]
    out["visual.proj"] = weight.t().contiguous()
    if "visual.ln_post.bias" in out:
        shift = fold_bias(weight, bias, "vision_proj")
        out["visual.ln_post.bias"] = (out["visual.ln_post.bias"].double() + shift).float()
    return out, unmapped


def file_name(key: str) -> str:
    """The checkpoint's name for one of the model's tensors: what an error about it should say."""
    if key.startswith("text.transformer."):
        return TEXT + key[len("text.transformer.") :]
    fixed = {
        "visual.proj": "vision_proj.weight",
        "text.proj.weight": "text_proj.weight",
        "logit_scale": "temp",
    }
    if key in fixed:
        return fixed[key]
    block = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.(.+)", key)
    if block:
        layer, rest = block.groups()
        qkv = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
        if qkv:
            return f"{VISION}encoder.layers.{layer}.self_attn.{{q,k,v}}_proj.{qkv[1]}"
        old = next((old + rest[len(new) :] for old, new in BLOCK_RENAMES if rest.startswith(new)), rest)
        return f"{VISION}encoder.layers.{layer}.{old}"
    rest = key.removeprefix("visual.")
    return VISION + next(
        (old + rest[len(new) :] for old, new in VISION_RENAMES if rest.startswith(new)), rest
    )


def _text_state(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Size], vocab_size: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, notes = {}, []
    for key, value in state.items():
        if key.startswith(TEXT) and not IGNORED.search(key):
            out["text.transformer." + key[len(TEXT) :]] = value
    words = "text.transformer.embeddings.word_embeddings.weight"
    if words in out and out[words].shape[0] > vocab_size:
        extra = out[words].shape[0] - vocab_size
        notes.append(f"text_encoder.embeddings.word_embeddings.weight[{vocab_size}:] ({extra} added tokens)")
        out[words] = out[words][:vocab_size]
    token_types = "text.transformer.embeddings.token_type_embeddings.weight"
    if token_types in expected and token_types not in out:  # FLIP's BERT has none: adding zeros is the same
        out[token_types] = torch.zeros(expected[token_types])
    layers = [
        k
        for k in expected
        if re.fullmatch(r"text\.transformer\.encoder\.layer\.\d+\.output\.LayerNorm\.bias", k)
    ]
    weight, bias = state["text_proj.weight"], state["text_proj.bias"]
    out["text.proj.weight"] = weight
    if layers:
        last = max(layers, key=lambda k: int(k.split(".")[4]))
        if last in out:
            out[last] = (out[last].double() + fold_bias(weight, bias, "text_proj")).float()
    return out, notes


def load_flip_base(
    path: str | os.PathLike, text_model: str = "bert-base-uncased"
) -> tuple[FlipModel, list[str]]:
    """FLIP-Base's contrastive path as a FlipModel; also the checkpoint's tensors it does not use."""
    source = str(path)
    state = state_dict_of(read_weights(path, WHAT))
    for key in ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp"):
        if key not in state:
            raise WeightsError(f"{source!r} lacks {key!r}: it is not {WHAT}")
    if os.path.isdir(text_model):  # absolute, so a converted checkpoint rebuilds it from anywhere
        text_model = str(Path(text_model).resolve())
    arch = architecture(state, text_model)
    try:
        model = build_unloaded("flip-base", arch=arch, image_resize_mode="squash")
    except OSError as err:  # transformers could not find the BERT config or tokenizer
        raise FileNotFoundError(
            f"FLIP-Base's text tower needs its BERT config and tokenizer: text_model={text_model!r} is "
            f"neither a local folder holding them nor a hub id that could be fetched "
            f"({str(err).splitlines()[0]})"
        ) from None
    expected = {k: v.shape for k, v in model.clip.state_dict().items()}
    vocab_size = int(model.clip.text.config.vocab_size)
    mapped, unmapped = _vision_state(state, source)
    text, notes = _text_state(state, expected, vocab_size)
    mapped.update(text)
    temp = state["temp"].double().reshape(())
    mapped["logit_scale"] = torch.log(1 / temp).to(torch.float32)
    used = {"vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp"}
    ignored = sorted(k for k in state if IGNORED.search(k))
    unknown = unmapped + sorted(
        k for k in state if not k.startswith((VISION, TEXT)) and k not in used and not IGNORED.search(k)
    )
    if unknown:
        raise WeightsError(f"{source!r} has tensors FLIP-Base does not: {unknown[:8]}; it is not {WHAT}")
    check_keys(
        expected,
        mapped,
        source,
        f"{WHAT} with a {text_model!r} text tower",
        unexpected_ok=False,
        name=file_name,
    )
    model.clip.load_state_dict(mapped)
    return model, report_ignored(source, ignored + notes)
