"""Layer-wise learning-rate decay: the deeper into the tower, the faster a weight learns.

BEiT's rule, which most ViT fine-tuning recipes follow: a ViT with L blocks has depths
0 .. L + 1. Depth 0 is the input side (patch embedding, class token, position embedding,
ln_pre), depth i is block i (1-based), depth L + 1 is everything after the last block (ln_post,
the projection) and the head. A parameter at depth d learns at `lr * decay ** (L + 1 - d)`:
the head and the projection at `lr`, block L at `lr * decay`, the embeddings at
`lr * decay ** (L + 1)`. LoRA adapters sit at the depth of the layer they adapt. `decay = 1`
gives every parameter `lr`.

Each depth is two optimizer groups, with and without weight decay (flip.training.optim's split:
gains, biases and embeddings are not shrunk), named `depth<d>` and `depth<d>_no_decay`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from flip.training.optim import decays

_BLOCK = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.")
_INPUT_SIDE = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "patch_dropout.")
_PEFT_WRAPPING = re.compile(r"^base_model\.model\.")
TOWER_PREFIX = "model.clip.visual."


def tower_depth(name: str, blocks: int) -> int:
    """The depth of a parameter of a ViT image tower, named as in the tower (peft's wrapping allowed)."""
    name = _PEFT_WRAPPING.sub("", name)
    found = _BLOCK.search(name)
    if found:
        return int(found.group(1)) + 1
    if name.startswith(_INPUT_SIDE):
        return 0
    return blocks + 1


def vit_blocks(visual: nn.Module) -> int:
    """The number of blocks of a ViT image tower (wrapped by peft or not); an error for other towers."""
    transformer = getattr(visual, "transformer", None)
    resblocks = getattr(transformer, "resblocks", None)
    if resblocks is None:
        raise ValueError(
            f"optim.layer_decay needs a ViT image tower (open_clip's transformer.resblocks), not "
            f"{type(getattr(visual, 'model', visual)).__name__}; set optim.layer_decay=1.0 for this tower"
        )
    return len(resblocks)


def depth_of(name: str, blocks: int) -> int:
    """The depth of a parameter of the fine-tuning module: the tower's by `tower_depth`, the head
    (and anything else outside the image tower) at the top, L + 1."""
    if name.startswith(TOWER_PREFIX):
        return tower_depth(name[len(TOWER_PREFIX) :], blocks)
    return blocks + 1


def layer_decay_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    blocks: int,
    lr: float,
    decay: float,
    weight_decay: float,
) -> list[dict]:
    """Optimizer groups of the trainable parameters, one per (depth, weight decay or not), at their rates."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"optim.layer_decay={decay} must be in (0, 1]; 1 gives every layer optim.lr")
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        depth, decayed = depth_of(name, blocks), decays(name, param)
        group = groups.get((depth, decayed))
        if group is None:
            group = groups[(depth, decayed)] = {
                "name": f"depth{depth}" + ("" if decayed else "_no_decay"),
                "params": [],
                "param_names": [],
                "lr": lr * decay ** (blocks + 1 - depth),
                "weight_decay": weight_decay if decayed else 0.0,
            }
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]
