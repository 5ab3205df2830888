"""Hugging Face text towers (BERT and family), built by open_clip's `HFTextEncoder`.

open_clip already builds a `transformers` encoder as a CLIP text tower when the architecture's
`text_cfg` names one (`hf_model_name`: a hub id or a local folder), with its tokenizer
(`hf_tokenizer_name`), a pooler and a projection to the joint dimension. FLIP adds the
short pooling names used in its configs (`cls`, `mean`), checks the choices early, and the
per-token features that FILIP's late interaction needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from open_clip.hf_model import _POOLERS, HFTextEncoder

# FLIP's names -> open_clip's poolers. `cls` is the [CLS] token's last hidden state (as FLIP and
# BLIP use it); `cls_pooler` adds BERT's own tanh pooler layer on top; `mean` averages real tokens.
POOLING = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}
PROJECTIONS = ("linear", "mlp")


def resolve_text_cfg(arch: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `arch` with FLIP's pooling names mapped to open_clip's; unknown choices fail here."""
    arch = dict(arch)
    text_cfg = dict(arch.get("text_cfg") or {})
    if not text_cfg.get("hf_model_name"):
        return arch
    pooler = text_cfg.get("hf_pooler_type", "mean")
    pooler = POOLING.get(pooler, pooler)
    if pooler not in _POOLERS:
        raise ValueError(
            f"model.arch.text_cfg.hf_pooler_type={text_cfg.get('hf_pooler_type')!r} is not a pooling; "
            f"use one of {sorted(POOLING)} or open_clip's {sorted(_POOLERS)}"
        )
    projection = text_cfg.get("hf_proj_type", "linear")
    if projection not in PROJECTIONS:
        raise ValueError(
            f"model.arch.text_cfg.hf_proj_type={projection!r}: the projection to the joint dimension "
            f"is one of {list(PROJECTIONS)}"
        )
    text_cfg.update(hf_pooler_type=pooler, hf_proj_type=projection)
    text_cfg.setdefault("hf_tokenizer_name", text_cfg["hf_model_name"])
    arch["text_cfg"] = text_cfg
    return arch


def hf_text_with_tokens(
    encoder: HFTextEncoder, text: torch.Tensor, hidden: bool = False
) -> tuple[torch.Tensor, ...]:
    """Pooled and per-token features of one forward pass, both projected to the joint dimension;
    with `hidden`, also the last hidden states before the projection (what ITM fusion reads).

    The same projection maps the pooled vector and every token, so token and pooled features
    live in one space, as the late-interaction loss requires.
    """
    attention_mask = (text != encoder.config.pad_token_id).long()
    out = encoder.transformer(input_ids=text, attention_mask=attention_mask)
    pooled = encoder.pooler(out, attention_mask)
    features = encoder.proj(pooled), encoder.proj(out.last_hidden_state)
    return (*features, out.last_hidden_state) if hidden else features
