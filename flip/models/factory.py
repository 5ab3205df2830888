"""Build a FLIP model from an open_clip architecture name or a custom tower config.

Custom architectures are registered in open_clip's own registry, so that open_clip's factory
builds every model, tokenizer and transform the same way: a custom FLIP model is an ordinary
open_clip model, and everything later issues add (pretrained loading, export) takes one path.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
from open_clip.factory import get_model_config

from flip.models.flip_model import FlipModel
from flip.models.hf_text import resolve_text_cfg
from flip.models.image_stem import add_conv_stem

_REQUIRED_ARCH_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_registry_dir: Path | None = None


def _config_dir() -> Path:
    """A per-process folder for registered configs: open_clip's registry reads JSON files."""
    global _registry_dir
    if _registry_dir is None:
        _registry_dir = Path(tempfile.mkdtemp(prefix="flip-open-clip-configs-"))
        atexit.register(shutil.rmtree, _registry_dir, ignore_errors=True)
    return _registry_dir


def register_architecture(name: str, arch: Mapping[str, Any]) -> None:
    """Make `name` buildable by open_clip from the custom tower config `arch`."""
    missing = [key for key in _REQUIRED_ARCH_KEYS if key not in arch]
    if missing:
        raise ValueError(
            f"model.arch for {name!r} lacks {missing}; an open_clip architecture needs "
            f"{list(_REQUIRED_ARCH_KEYS)} (see open_clip/model_configs/*.json for examples)"
        )
    arch = json.loads(json.dumps(dict(arch)))  # plain, JSON-safe copy of an OmegaConf node
    existing = get_model_config(name)
    path = _config_dir() / f"{name}.json"
    if existing is not None and existing != arch and not path.exists():
        raise ValueError(
            f"model.name {name!r} is a built-in open_clip architecture; give your custom "
            f"model.arch another name, or set model.arch=null to use the built-in one"
        )
    path.write_text(json.dumps(arch))
    open_clip.add_model_config(path)


def tower_weight_flags(name: str) -> dict[str, bool]:
    """Whether open_clip should load a Hugging Face text tower's / timm image tower's own weights.

    open_clip 3 decides that by `create_model(pretrained_text=..., pretrained_image=...)` and
    overwrites the architecture's `hf_model_pretrained` / `timm_model_pretrained`; FLIP's configs
    (and the weight-free recipe in checkpoints) say it in the architecture, so pass it on.
    """
    cfg = get_model_config(name) or {}
    text, vision = cfg.get("text_cfg") or {}, cfg.get("vision_cfg") or {}
    flags = {}
    if "hf_model_name" in text:
        flags["pretrained_text"] = bool(text.get("hf_model_pretrained", True))
    if "timm_model_name" in vision:
        flags["pretrained_image"] = bool(vision.get("timm_model_pretrained", False))
    return flags


def absolute_model_name(name: str) -> str:
    """`local-dir:` names made absolute, so a checkpoint rebuilds the model from any directory."""
    if name.startswith("local-dir:"):
        return f"local-dir:{Path(name[len('local-dir:') :]).expanduser().resolve()}"
    return name


def build_model(
    name: str,
    arch: Mapping[str, Any] | None = None,
    pretrained: str | None = None,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
    cache_dir: str | None = None,
    image_resize_mode: str | None = None,
    fusion: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    image_stem: Mapping[str, Any] | None = None,
    text_length_buckets: int | None = None,
    foil_prefix_sharing: bool = False,
) -> FlipModel:
    """Create towers, tokenizer and transforms for `name`.

    `name` is an open_clip architecture (`open_clip.list_models()`), an `hf-hub:`/`local-dir:`
    reference, or, together with `arch`, a custom architecture. `pretrained` is an open_clip
    tag or a checkpoint path; random initialisation when None. `init_logit_scale` /
    `init_logit_bias` start the learnable temperature and logit bias (model.init_logit_* in the
    config); None keeps the architecture's own (open_clip's CLIP: log(1/0.07) and no bias), and
    only a model built with a bias has that parameter. `image_resize_mode` overrides open_clip's
    evaluation resize (`squash`: the whole image to the square input, as FLIP-Base was evaluated);
    None keeps the architecture's (resize the short side, centre crop). `fusion` ({layers, heads,
    mlp_ratio}) adds the image-text matching fusion and head (flip.models.fusion); None: none.
    `image_size` builds the image tower for that input size instead of the architecture's (open_clip's
    `force_image_size`; its transforms follow): how a model fine-tuned at another resolution
    (finetune.py image_size=, flip.training.finetune.resolution) is rebuilt. None: the architecture's.
    `image_stem` ({channels}) replaces the ViT's patch projection by a convolutional stem
    (flip.models.image_stem), newly initialised: only for a model trained from scratch.
    `text_length_buckets` encodes each batch's captions in that many groups of similar length,
    each cut to its longest caption (flip.models.length_buckets): the same features for less
    work in open_clip's causal text tower. None or 0: the whole context for every caption.
    `foil_prefix_sharing` encodes each foil caption (`data.hard_negatives`) from its first token
    that differs from its caption, on the caption's keys and values (flip.models.foil_prefix):
    the same features for less work where the text tower is the larger part of a step.
    """
    if image_stem is not None and (pretrained is not None or ":" in name):
        raise ValueError(
            f"model.image_stem={image_stem!r} with model.name={name!r}, "
            f"model.pretrained={pretrained!r}: the stem replaces the patch projection those weights were "
            "trained with; use it with a custom architecture trained from scratch (model.pretrained=null), "
            "or set model.image_stem=null"
        )
    if ":" in name and pretrained is not None:
        raise ValueError(
            f"model.pretrained={pretrained!r} with model.name={name!r}: open_clip takes the weights of an "
            "hf-hub:/local-dir: model from there and would ignore pretrained; set model.pretrained=null"
        )
    name = absolute_model_name(name)
    if arch is not None:
        arch = resolve_text_cfg(json.loads(json.dumps(dict(arch))))
        register_architecture(name, arch)
    elif ":" not in name and name not in open_clip.list_models():
        raise ValueError(
            f"unknown model.name {name!r}: not an open_clip architecture and no model.arch "
            f"given. Known architectures: {', '.join(open_clip.list_models())}"
        )
    model_kwargs: dict[str, Any] = {}
    if init_logit_scale is not None:
        model_kwargs["init_logit_scale"] = float(init_logit_scale)
    if init_logit_bias is not None:
        model_kwargs["init_logit_bias"] = float(init_logit_bias)
    if image_resize_mode is not None:
        model_kwargs["image_resize_mode"] = image_resize_mode
    if image_size is not None:
        model_kwargs["force_image_size"] = int(image_size)
    clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, cache_dir=cache_dir, **tower_weight_flags(name), **model_kwargs
    )
    if image_stem is not None:
        add_conv_stem(clip.visual, image_stem)
    tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    config = {
        "name": name,
        "arch": None if arch is None else json.loads(json.dumps(dict(arch))),
        "pretrained": None,  # weights come from the FLIP checkpoint when rebuilding
        "init_logit_scale": init_logit_scale,
        "init_logit_bias": init_logit_bias,
    }
    if image_resize_mode is not None:  # only then, so configs saved before the option stay equal
        config["image_resize_mode"] = image_resize_mode
    if image_size is not None:  # likewise
        config["image_size"] = int(image_size)
    if fusion is not None:  # likewise
        config["fusion"] = json.loads(json.dumps(dict(fusion)))
    if image_stem is not None:  # likewise
        config["image_stem"] = json.loads(json.dumps(dict(image_stem)))
    if text_length_buckets:  # likewise
        config["text_length_buckets"] = text_length_buckets
    if foil_prefix_sharing:  # likewise
        config["foil_prefix_sharing"] = foil_prefix_sharing
    return FlipModel(clip, tokenizer, preprocess_train, preprocess_val, config)
