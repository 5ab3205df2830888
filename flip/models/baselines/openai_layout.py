"""OpenAI-CLIP-layout state dicts: OpenAI's own weights, FaRL, and any open_clip `CLIP` saved as a file.

OpenAI's CLIP and open_clip's `CLIP` name their parameters the same way (`visual.conv1.weight`,
`transformer.resblocks.0.attn.in_proj_weight`, `text_projection`, `logit_scale`, ...), so such a
file loads into the open_clip architecture that has the same shapes. FaRL
(`FaRL-Base-Patch16-LAIONFace20M-ep16.pth`/`-ep64.pth`) is a ViT-B/16 CLIP with QuickGELU and
OpenAI's tokenizer, saved under a `state_dict` key: open_clip's `ViT-B-16-quickgelu` (FaRL's
larger models: give their open_clip architecture as `name`). FaRL's README loads it with
`strict=False` into OpenAI's model, and its `load_farl` takes the `visual.*` tensors of
`checkpoint["state_dict"]` for its image tower; here every tensor of the model must be in the
file, and the file's extra tensors (OpenAI's `input_resolution`/`context_length`/`vocab_size`
entries, training-only heads) are named as ignored.
"""

from __future__ import annotations

import logging
import os

from flip.models.baselines.weights import check_keys, read_weights, report_ignored, state_dict_of
from flip.models.factory import build_model
from flip.models.flip_model import FlipModel

FARL_ARCH = "ViT-B-16-quickgelu"


class _DropRandomInitNotice(logging.Filter):
    """open_clip says "model initialized randomly" for the model the file's weights then fill."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def build_unloaded(name: str, **kwargs) -> FlipModel:
    notice = _DropRandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        return build_model(name, **kwargs)
    finally:
        logging.getLogger().removeFilter(notice)


def load_openai_layout(path: str | os.PathLike, name: str, what: str) -> tuple[FlipModel, list[str]]:
    """open_clip architecture `name` with the weights of the OpenAI-layout file at `path`."""
    state = state_dict_of(read_weights(path, what))
    model = build_unloaded(name)
    expected = {k: v.shape for k, v in model.clip.state_dict().items()}
    ignored = check_keys(expected, state, str(path), f"{what} (open_clip {name!r})")
    model.clip.load_state_dict({k: state[k] for k in expected})
    return model, report_ignored(str(path), ignored)
