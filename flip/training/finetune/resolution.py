"""Fine-tuning at another input size than the tower's own (finetune.py `image_size=`).

FaRL pretrains its ViT at 224 px and fine-tunes parsing and landmarks at 448 px: more patch
tokens per face, finer masks and points. The re-sized model is built by open_clip for the new
size (`build_model(image_size=...)`, open_clip's `force_image_size`: its transforms follow),
and takes the old weights with the position embedding interpolated by open_clip's own
`resize_pos_embed`, the one open_clip applies when it loads weights at another size. The new
size is in the model's config, so checkpoints and exports rebuild at it (`flip.load`).

Only open_clip's VisionTransformer can be re-sized this way (its one size-bound weight is the
position embedding of a square grid); the new size must be a multiple of its patch size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from open_clip.model import CLIPVisionCfg, resize_pos_embed
from open_clip.transformer import VisionTransformer

from flip.checkpoint import weights_loaded_after
from flip.models import FlipModel, build_model

log = logging.getLogger(__name__)
CLIP_PREFIX = "clip."
ACCEPTED = "null (the tower's own input size) or a multiple of the patch size of an open_clip ViT image tower"


def _refuse(size: Any, why: str) -> ValueError:
    return ValueError(f"image_size={size!r}: {why}; image_size is {ACCEPTED}")


def _check_patch(size: int, patch: int, own: int | None) -> None:
    if size % patch:
        below, above = size // patch * patch, (size // patch + 1) * patch
        nearest = f"{below} or {above}" if below else f"{above}"
        own_size = "" if own is None else f", or null for the tower's own {own}"
        raise _refuse(size, f"the tower's patch size {patch} does not divide it (e.g. {nearest}{own_size})")


def check_image_size(size: Any, vision_cfg: Mapping[str, Any] | None = None) -> None:
    """Fail on a size no tower takes, or (given the architecture's `vision_cfg`) one this tower cannot take.

    Reads no file: finetune.py calls it before any work, and the model check (`resized`) repeats
    what this cannot see (a tower from `ckpt`, an `hf-hub:` architecture).
    """
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise _refuse(size, "not a positive whole number of pixels")
    if vision_cfg is None:
        return
    if vision_cfg.get("timm_model_name"):
        raise _refuse(
            size,
            f"the image tower is timm's {vision_cfg['timm_model_name']!r} (vision_cfg.timm_model_name), not "
            "open_clip's VisionTransformer, whose position embedding FLIP interpolates",
        )
    patch = vision_cfg.get("patch_size", CLIPVisionCfg.patch_size)
    own = vision_cfg.get("image_size", CLIPVisionCfg.image_size)
    _check_patch(size, int(patch), int(own) if isinstance(own, int) else None)


def resized(model: FlipModel, size: int | None) -> FlipModel:
    """`model` with its image tower built for `size` x `size` inputs and the same weights, the position
    embedding interpolated by open_clip; `model` itself when `size` is None or already its size."""
    check_image_size(size)
    if size is None:
        return model
    visual = model.clip.visual
    if not isinstance(visual, VisionTransformer):
        raise _refuse(
            size,
            f"the image tower is a {type(visual).__name__}, not open_clip's VisionTransformer, whose "
            "position embedding FLIP interpolates",
        )
    height, width = visual.image_size
    if visual.grid_size[0] != visual.grid_size[1]:
        raise _refuse(
            size, f"the tower's input is {height}x{width}, not square (open_clip resizes square grids)"
        )
    _check_patch(size, int(visual.patch_size[0]), int(height))
    if (height, width) == (size, size):
        return model
    with weights_loaded_after():  # the weights are the model's, given right after
        new = build_model(**{**model.config, "pretrained": None, "image_size": size})
    state = model.state_dict()
    tower = {k[len(CLIP_PREFIX) :]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
    resize_pos_embed(tower, new.clip)  # in place: 'visual.positional_embedding' to the new grid
    rest = {k: v for k, v in state.items() if not k.startswith(CLIP_PREFIX)}
    new.load_state_dict({**rest, **{CLIP_PREFIX + k: v for k, v in tower.items()}})
    log.info("image tower re-sized from %dx%d to %dx%d px", height, width, size, size)
    parameter = next(model.parameters())
    return new.to(device=parameter.device).train(model.training)
