"""The one structure that flows from the towers to the losses.

Keeping it explicit lets a loss declare what it needs (pooled features only, or token
features too) without the Lightning module knowing which loss is configured.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class EncoderOutput:
    """Features of one batch of (image, caption) pairs.

    `image_features` / `text_features` are pooled, projected and L2-normalised, shape [B, D].
    `logit_scale` is already exponentiated (the temperature's inverse), as open_clip returns it.
    Token fields are filled only when a loss asks for them (`requires_tokens`): projected,
    L2-normalised token features [B, N, D]; `text_token_mask` [B, Nt] is True for the tokens
    that can carry caption information (words and end-of-text; a bidirectional tower's [CLS])
    and False for padding and a causal tower's constant start token. `image_token_mask` is None when every
    image token is real.

    With attribute hard negatives (`data.hard_negatives`), `foil_text_features` [B, F, D] are
    the F foils of each caption (pooled, projected, L2-normalised), `foil_mask` [B, F] True for
    the foils that exist, and, when the loss asks for tokens, `foil_text_tokens` [B, F, Nt, D]
    with `foil_text_token_mask` [B, F, Nt]; all None when off.

    A model with an image-text matching fusion (`model.fusion`), asked for tokens, also returns
    the unprojected token states the fusion reads, `image_hidden` [B, Ni, Wi] and `text_hidden`
    [B, Nt, Wt], and the caption token ids `text_ids` [B, Nt] (padding, duplicate captions).
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None
    text_tokens: torch.Tensor | None = None
    text_token_mask: torch.Tensor | None = None
    image_token_mask: torch.Tensor | None = None
    foil_text_features: torch.Tensor | None = None
    foil_mask: torch.Tensor | None = None
    foil_text_tokens: torch.Tensor | None = None
    foil_text_token_mask: torch.Tensor | None = None
    image_hidden: torch.Tensor | None = None
    text_hidden: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None

    def float(self) -> EncoderOutput:
        """The same output with every floating-point tensor in float32 (masks stay boolean)."""
        changes = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                changes[field.name] = value.float()
        return replace(self, **changes)
