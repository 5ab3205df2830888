"""Image-text matching (ITM): a fusion encoder whose text tokens attend to the image tokens, and a
2-way head that says whether the pair matches (ALBEF, BLIP, FLIP-Base).

The contrastive towers compare one pooled vector per side; a matching head reads the caption
word by word against the image patches, so it can tell "with a mustache" from "without a
mustache" where a bag-of-words embedding cannot. The fusion runs on the towers' *unprojected*
token states (text width and image width, before the joint projection and normalisation): the
projection is shaped for cosine similarity, while cross-attention wants every channel the tower
has. Its first text position is read as the pair's summary ([CLS] in BERT, the start token in
open_clip's causal tower, which the fusion's bidirectional self-attention lets read the whole
caption and the image).

It is part of the model (`FlipModel.fusion`), so checkpoints and safetensors exports carry it and
`flip.load` rebuilds it from the model config (`model.fusion`); the contrastive path never runs it.

Two styles (`model.fusion.style`): `stack`, the blocks below on the text tower's token states (any
text tower; `layers`, `heads`); `blip`, for Hugging Face BERT towers, BLIP's text encoder in its
multimodal mode: the caption runs through BERT's own embeddings, self-attention and feed-forward
weights (shared with the contrastive text tower) with a new cross-attention layer to the image
after every self-attention, so the matching head starts from what BERT already knows (`auto`: blip
for a BERT tower, stack otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

FUSION_KEYS = ("style", "layers", "heads", "mlp_ratio")
STYLES = ("auto", "stack", "blip")


class FusionBlock(nn.Module):
    """Pre-norm self-attention over the text, cross-attention to the image, MLP: a BLIP text-encoder
    layer with its cross-attention."""

    def __init__(self, width: int, image_width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_cross = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(
            width, heads, kdim=image_width, vdim=image_width, batch_first=True
        )
        self.ln_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, text: torch.Tensor, padding: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.ln_self(text)
        text = text + self.self_attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        h = self.ln_cross(text)
        text = text + self.cross_attn(h, image, image, need_weights=False)[0]
        return text + self.mlp(self.ln_mlp(text))


class ItmFusion(nn.Module):
    """`layers` fusion blocks of the text width (`heads` heads) over image tokens of `image_width`,
    a final LayerNorm and the ITM head (Linear to 2: column 1 is "matches")."""

    def __init__(
        self, text_width: int, image_width: int, layers: int = 2, heads: int = 2, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        for name, value in (("layers", layers), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.fusion.{name} must be a positive integer, got {value!r}")
        if text_width % heads:
            raise ValueError(
                f"model.fusion.heads={heads} does not divide the text width {text_width}; "
                f"use a divisor of {text_width}"
            )
        self.blocks = nn.ModuleList(
            FusionBlock(text_width, image_width, heads, float(mlp_ratio)) for _ in range(layers)
        )
        self.ln_final = nn.LayerNorm(text_width)
        self.itm_head = nn.Linear(text_width, 2)

    def forward(
        self, image_hidden: torch.Tensor, text_hidden: torch.Tensor, text_padding: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits [B, 2] of pairs (image_hidden[b] [Ni, Wi], text_hidden[b] [Nt, Wt]);
        `text_padding` [B, Nt] is True at padding, which no token attends to."""
        x = text_hidden
        for block in self.blocks:
            x = block(x, text_padding, image_hidden)
        return self.itm_head(self.ln_final(x[:, 0]))


class BertCrossFusion(nn.Module):
    """BLIP's multimodal text encoder on a Hugging Face BERT: one new cross-attention layer (BERT's
    own kind, `BertAttention(is_cross_attention=True)`) per BERT layer, a projection of the image
    states to BERT's width when they differ, and the ITM head on [CLS]. BERT itself is not held
    (its weights are the text tower's, saved once): `forward` is given it."""

    def __init__(self, bert_config: Any, image_width: int) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertAttention

        hidden = int(bert_config.hidden_size)
        self.cross = nn.ModuleList(
            BertAttention(bert_config, layer_idx=i, is_cross_attention=True)
            for i in range(bert_config.num_hidden_layers)
        )
        self.image_proj = nn.Identity() if image_width == hidden else nn.Linear(image_width, hidden)
        self.itm_head = nn.Linear(hidden, 2)

    def forward(
        self, image_hidden: torch.Tensor, text_ids: torch.Tensor, text_padding: torch.Tensor, bert: nn.Module
    ) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        x = bert.embeddings(input_ids=text_ids)
        mask = create_bidirectional_mask(
            config=bert.config, inputs_embeds=x, attention_mask=(~text_padding).long()
        )
        image = self.image_proj(image_hidden)
        for layer, cross in zip(bert.encoder.layer, self.cross, strict=True):
            x = layer.attention(x, mask)[0]
            x = cross(x, None, image, None)[0]
            x = layer.feed_forward_chunk(x)
        return self.itm_head(x[:, 0])


def build_fusion(
    cfg: Mapping[str, Any] | None, text_width: int, image_width: int, bert_config: Any = None
) -> nn.Module | None:
    """The model's ITM fusion from `model.fusion` ({style, layers, heads, mlp_ratio}), or None when
    null; `bert_config` is the Hugging Face text tower's config, None for other towers."""
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise ValueError(f"model.fusion must be null or a mapping with keys {list(FUSION_KEYS)}, got {cfg!r}")
    unknown = sorted(set(cfg) - set(FUSION_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in model.fusion; accepted: {list(FUSION_KEYS)}")
    cfg = dict(cfg)
    style = cfg.pop("style", "auto")
    if style not in STYLES:
        raise ValueError(f"model.fusion.style={style!r}; accepted: {list(STYLES)}")
    is_bert = getattr(bert_config, "model_type", None) == "bert"
    if style == "blip" and not is_bert:
        raise ValueError(
            "model.fusion.style=blip inserts cross-attention into a Hugging Face BERT text tower's "
            "layers; this text tower is not BERT: use style=stack (or auto)"
        )
    if style == "blip" or (style == "auto" and is_bert):
        return BertCrossFusion(bert_config, image_width)  # layers and heads are BERT's
    return ItmFusion(text_width, image_width, **cfg)
