"""Initialising towers from pretrained weights, and the weight-free recipe a checkpoint keeps.

Whole models come from open_clip (`model.pretrained`: a tag such as `openai`, or a checkpoint
file). FLIP's usual starting point mixes sources, e.g. a CLIP ViT-B/16 image tower beside a BERT
text tower; so each tower can also be initialised on its own (`model.image_init`,
`model.text_init`) from an open_clip model + tag or from a checkpoint file (open_clip's state
dict or a FLIP `.ckpt`). A Hugging Face text tower loads its weights through open_clip
(`text_cfg.hf_model_pretrained`, from a hub id or a local folder).

A trained checkpoint holds every weight, so the recipe saved in it (`weightless`) names no
weight source: `flip.load` never downloads or reads anything but the checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import open_clip
import torch
from open_clip.factory import load_state_dict

from flip.models.flip_model import FlipModel

log = logging.getLogger(__name__)

TOWERS = ("image", "text")
INIT_KEYS = {"image": "image_init", "text": "text_init"}
TEMPERATURE_KEYS = ("logit_scale", "logit_bias")
FLIP_PREFIX = "model.clip."
PROJECTION_KEYS = ("visual.proj", "text_projection", "text_projection.weight", "text_projection.bias")
PROJECTION_PREFIXES = ("visual.head.", "text.proj.")


def in_tower(key: str, tower: str) -> bool:
    """open_clip names the image tower `visual.*`; everything else but the temperature is text."""
    if tower == "image":
        return key.startswith("visual.")
    return not key.startswith("visual.") and key not in TEMPERATURE_KEYS


def source_weights(
    source: Mapping[str, Any], cache_dir: str | None = None
) -> tuple[dict[str, torch.Tensor], torch.nn.Module | None]:
    """open_clip-keyed weights of a whole model from `{name, pretrained}` or `{checkpoint}`, and
    the model itself where one was built (a name), so that what the weights need beyond their
    tensors (the activation) can be checked against the tower they go into."""
    if "checkpoint" in source:
        path = str(source["checkpoint"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tower init checkpoint {path!r} does not exist")
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(raw, dict) and "hyper_parameters" in raw and "state_dict" in raw:  # a FLIP .ckpt
            prefixed = raw["state_dict"].items()
            return {k[len(FLIP_PREFIX) :]: v for k, v in prefixed if k.startswith(FLIP_PREFIX)}, None
        return load_state_dict(path, weights_only=True), None
    if "name" in source:
        model = open_clip.create_model(
            source["name"], pretrained=source.get("pretrained"), cache_dir=cache_dir
        )
        return model.state_dict(), model
    raise ValueError(
        f"a tower init is {{name: <open_clip model>, pretrained: <tag or file>}} or {{checkpoint: <path>}}, "
        f"got {dict(source)!r}"
    )


def tower_activation(clip: torch.nn.Module, tower: str) -> str | None:
    """The class name of the MLP activation in an open_clip tower's blocks; None for other towers
    (a Hugging Face text tower keeps its own in its config)."""
    for name, module in clip.named_modules():
        if in_tower(name, tower) and name.endswith(".mlp.gelu"):
            return type(module).__name__
    return None


def check_activation(
    model: FlipModel, source_model: torch.nn.Module, tower: str, source: Mapping[str, Any]
) -> None:
    """Refuse weights trained with another activation than the tower's: every tensor would fit,
    and the tower would quietly compute something else (OpenAI's CLIP weights use QuickGELU,
    open_clip's architectures GELU unless `quick_gelu` is set)."""
    given, own = tower_activation(source_model, tower), tower_activation(model.clip, tower)
    if given is not None and own is not None and given != own:
        fix = "true" if given == "QuickGELU" else "false"
        raise ValueError(
            f"model.{INIT_KEYS[tower]}={dict(source)!r} was trained with {given}, and this {tower} "
            f"tower uses {own}; set model.arch.quick_gelu={fix} so that the tower computes what its "
            "weights were trained for"
        )


def is_projection(key: str) -> bool:
    """The maps from a tower into the joint space; a new joint size (FLIP's 256) makes them new."""
    return key in PROJECTION_KEYS or key.startswith(PROJECTION_PREFIXES)


def load_tower(model: FlipModel, tower: str, source: Mapping[str, Any], cache_dir: str | None = None) -> int:
    """Copy one tower's weights from `source` into `model`; returns the number of tensors copied.

    Every tensor of the tower must be in the source with its shape, except the projection to
    the joint space, which keeps its initialisation when the source's does not fit (e.g. a
    CLIP ViT-B/16 image tower, 768 -> 512, under FLIP's 256-d joint space).
    """
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    weights, source_model = source_weights(source, cache_dir)
    if source_model is not None:
        check_activation(model, source_model, tower, source)
    own = {k: v for k, v in model.clip.state_dict().items() if in_tower(k, tower)}
    given = {k: v for k, v in weights.items() if in_tower(k, tower)}
    unfit = sorted(k for k in own if k not in given or own[k].shape != given[k].shape)
    bad = [k for k in unfit if not is_projection(k)]
    if bad:
        detail = [(k, tuple(given[k].shape) if k in given else None, tuple(own[k].shape)) for k in bad[:4]]
        raise ValueError(
            f"model.{INIT_KEYS[tower]}={dict(source)!r} does not fit this {tower} tower: "
            f"{len(bad)} tensor(s) missing or of another shape, e.g. (name, source shape, tower shape) "
            f"{detail}; the source must have the same {tower} tower architecture"
        )
    fitting = {k: given[k] for k in own if k not in unfit}
    model.clip.load_state_dict(fitting, strict=False)
    if unfit:
        log.warning("%s tower: kept the initialisation of %s (no fitting tensor in the source)", tower, unfit)
    log.info("initialised the %s tower from %s (%d tensors)", tower, dict(source), len(fitting))
    return len(fitting)


def weightless(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model recipe without any weight source: what a checkpoint needs to rebuild the towers."""
    recipe = copy.deepcopy(dict(model_cfg))
    recipe["pretrained"] = None
    for key in INIT_KEYS.values():
        recipe.pop(key, None)
    arch = recipe.get("arch")
    if arch:
        if (arch.get("text_cfg") or {}).get("hf_model_name"):
            arch["text_cfg"]["hf_model_pretrained"] = False
        if (arch.get("vision_cfg") or {}).get("timm_model_name"):
            arch["vision_cfg"]["timm_model_pretrained"] = False
    return recipe


def lock_towers(model: FlipModel, optim_cfg: Mapping[str, Any]) -> None:
    """Freeze towers as `optim` asks: `lock_image` is locked-image tuning (LiT).

    open_clip's own lock methods do the work, so `lock_image_unlocked_groups` /
    `lock_text_unlocked_layers` leave that many of the last layer groups trainable.
    """
    if optim_cfg.get("lock_image"):
        model.clip.lock_image_tower(
            unlocked_groups=int(optim_cfg.get("lock_image_unlocked_groups", 0)),
            freeze_bn_stats=bool(optim_cfg.get("lock_image_freeze_bn_stats", False)),
        )
    if optim_cfg.get("lock_text"):
        model.clip.lock_text_tower(
            unlocked_layers=int(optim_cfg.get("lock_text_unlocked_layers", 0)),
            freeze_layer_norm=bool(optim_cfg.get("lock_text_freeze_layer_norm", True)),
        )
