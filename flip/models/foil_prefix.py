"""Encode a foil from where it first differs from its caption, reusing the caption's states before.

A foil is its caption with one phrase changed (`data.hard_negatives`). In a causal text tower
token i reads tokens 0..i only, so every state of a foil before the changed phrase is its
caption's: with eight foils per caption, encoding them whole sends each caption's unchanged
start through the tower nine times. Here the caption's pass keeps each block's keys and values,
and a foil runs only its suffix (from the first token that differs to its end), attending to
the caption's keys and values for the positions before. Features and gradients are the whole
encoding's (tests/test_foil_prefix.py); the work is the suffixes' (bench/foil_prefix.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from torch import nn

__all__ = [
    "attend_mask",
    "block_keys_values",
    "first_differences",
    "shares_foil_prefixes",
    "split_heads",
    "suffix_block",
    "suffixes",
    "tokens_with_prefix",
]

POOLS_AT_THE_END = ("argmax", "eos")


def shares_foil_prefixes(clip: nn.Module) -> bool:
    """True where reusing the caption's states is exact: open_clip's causal, batch-first text
    transformer, pooled at the end-of-text token (a foil's own tokens), built of blocks whose
    attention this module can continue (plain dot-product attention, no learned key bias)."""
    if not isinstance(clip, CLIP) or clip.attn_mask is None or clip.text_pool_type not in POOLS_AT_THE_END:
        return False
    transformer = clip.transformer
    if not getattr(transformer, "batch_first", False):
        return False
    return all(_continuable(block) for block in transformer.resblocks)


def _continuable(block: nn.Module) -> bool:
    if isinstance(block, CustomResidualAttentionBlock):
        return block.attn.logit_scale is None  # scaled cosine attention computes other logits
    if isinstance(block, ResidualAttentionBlock):
        attn = block.attn
        return attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
    return False


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, L, W] -> [N, heads, L, W / heads]."""
    n, length, width = x.shape
    return x.view(n, length, heads, width // heads).transpose(1, 2)


def block_keys_values(block: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The keys and values [N, L, W] (heads side by side) `block` computes from its input `x`
    [N, L, W]: kept from the caption's pass for its foils' suffixes (`suffix_block`)."""
    attn = block.attn
    width = x.shape[-1]
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[width:]
    keys, values = F.linear(block.ln_1(x), attn.in_proj_weight[width:], bias).chunk(2, dim=-1)
    if isinstance(block, CustomResidualAttentionBlock) and not isinstance(attn.ln_k, nn.Identity):
        normed = attn.ln_k(split_heads(keys, attn.num_heads))
        keys = normed.transpose(1, 2).reshape(keys.shape)
    return [keys, values]


def suffix_block(
    block: nn.Module,
    x: torch.Tensor,
    past_keys: torch.Tensor,
    past_values: torch.Tensor,
    attend: torch.Tensor,
) -> torch.Tensor:
    """`block` applied to suffix tokens `x` [N, S, W] whose earlier positions' keys and values
    are `past_*` [N, heads, P, head width]; `attend` [N, 1, S, P + S] says which key each query
    reads (True). Written after open_clip's two residual blocks, which `shares_foil_prefixes`
    checks this is."""
    attn = block.attn
    heads = attn.num_heads
    queries, keys, values = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    queries, keys, values = (split_heads(t, heads) for t in (queries, keys, values))
    custom = isinstance(block, CustomResidualAttentionBlock)
    if custom:
        queries, keys = attn.ln_q(queries), attn.ln_k(keys)
    keys = torch.cat([past_keys.to(keys.dtype), keys], dim=2)
    values = torch.cat([past_values.to(values.dtype), values], dim=2)
    dropout = (attn.attn_drop.p if custom else attn.dropout) if block.training else 0.0
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=attend, dropout_p=dropout)
    if custom and attn.head_scale is not None:
        out = out * attn.head_scale
    out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    out = block.ln_attn(attn.out_drop(attn.out_proj(attn.ln_inner(out)))) if custom else attn.out_proj(out)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def first_differences(foils: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """[N]: the first position where each foil's token ids [N, L] differ from its caption's [N, L]
    (0 for a foil equal to its caption, which is then encoded whole)."""
    return (foils != captions).int().argmax(dim=1)


def suffixes(foils: torch.Tensor, starts: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[N, L]: each foil's token ids from `starts` on, moved to the front and padded after."""
    length = foils.shape[1]
    index = starts[:, None] + torch.arange(length, device=foils.device)
    inside = index < length
    moved = foils.gather(1, index.clamp(max=length - 1))
    return moved.masked_fill(~inside, pad_token_id)


def attend_mask(starts: torch.Tensor, past: int, length: int) -> torch.Tensor:
    """[N, 1, length, past + length]: a suffix token at j reads the caption's positions before its
    foil's start (of the first `past`) and the suffix's positions 0..j."""
    device = starts.device
    before = torch.arange(past, device=device)[None, None, :] < starts[:, None, None]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    before = before.expand(-1, length, -1)
    return torch.cat([before, causal.expand(len(starts), -1, -1)], dim=2)[:, None]


def tokens_with_prefix(
    caption_tokens: torch.Tensor, suffix_tokens: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """[N, L, D]: each foil's token features, its caption's [N, L, D] before `starts`, its suffix's
    [N, L, D] (suffix position 0 at `starts`) from there on."""
    length = caption_tokens.shape[1]
    positions = torch.arange(length, device=starts.device)[None, :]
    from_suffix = positions >= starts[:, None]
    index = (positions - starts[:, None]).clamp(min=0)
    moved = suffix_tokens.gather(1, index[..., None].expand(-1, -1, suffix_tokens.shape[-1]))
    return torch.where(from_suffix[..., None], moved, caption_tokens)
