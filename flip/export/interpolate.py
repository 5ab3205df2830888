"""WiSE-FT: the weight-space interpolation of a fine-tuned model and the zero-shot model it came from.

Wortsman et al. (2022, "Robust fine-tuning of zero-shot models") found that averaging the weights
of a fine-tuned CLIP with those of its zero-shot start keeps most of the fine-tuned accuracy and
much of the zero-shot robustness; `alpha` weights the fine-tuned model:
`alpha * finetuned + (1 - alpha) * zeroshot`, so 1 is the fine-tuned model and 0 the zero-shot one.
Both must be one architecture: every tensor of one is in the other with its shape. A fine-tune
of the image tower leaves the text tower as it was, so the mix answers zero-shot questions too.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch

from flip.checkpoint import load
from flip.models import FlipModel


def interpolate_state_dicts(
    finetuned: Mapping[str, torch.Tensor], zeroshot: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """`alpha * finetuned + (1 - alpha) * zeroshot` per floating tensor (each in its own dtype,
    computed in float32 at least); tensors that are not floating point (counters, index buffers)
    must be equal and are kept. The errors name every key that is missing or has another shape."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]: 1 is the fine-tuned model, 0 the zero-shot one")
    only_finetuned = sorted(set(finetuned) - set(zeroshot))
    only_zeroshot = sorted(set(zeroshot) - set(finetuned))
    if only_finetuned or only_zeroshot:
        raise ValueError(
            "the two models are not one architecture: "
            f"only in the fine-tuned one: {only_finetuned[:8]}{' ...' if len(only_finetuned) > 8 else ''}; "
            f"only in the zero-shot one: {only_zeroshot[:8]}{' ...' if len(only_zeroshot) > 8 else ''}"
        )
    shapes = [
        f"{key} {tuple(finetuned[key].shape)} vs {tuple(zeroshot[key].shape)}"
        for key in finetuned
        if finetuned[key].shape != zeroshot[key].shape
    ]
    if shapes:
        raise ValueError(f"the two models' tensors differ in shape (fine-tuned vs zero-shot): {shapes}")
    mixed = {}
    for key, tuned in finetuned.items():
        start = zeroshot[key]
        if not tuned.is_floating_point():
            if not torch.equal(tuned, start):
                raise ValueError(f"{key} is not floating point and differs between the models: cannot mix it")
            mixed[key] = tuned.clone()
            continue
        wide = torch.promote_types(tuned.dtype, torch.float32)
        mixed[key] = torch.lerp(start.to(wide), tuned.to(wide), float(alpha)).to(tuned.dtype)
    return mixed


def interpolate(
    finetuned: FlipModel | str | os.PathLike, zeroshot: FlipModel | str | os.PathLike, alpha: float
) -> FlipModel:
    """A new model with the WiSE-FT mix of the two (models, or what `flip.load` reads from paths),
    built as the fine-tuned one is."""
    tuned = finetuned if isinstance(finetuned, FlipModel) else load(finetuned)
    start = zeroshot if isinstance(zeroshot, FlipModel) else load(zeroshot)
    mixed = interpolate_state_dicts(tuned.state_dict(), start.state_dict(), alpha)
    model = copy.deepcopy(tuned)
    model.load_state_dict(mixed)
    return model.eval()
