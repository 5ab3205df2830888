"""Encode captions in groups of similar length, each group cut to its longest caption.

In a causal text tower token i reads tokens 0..i only, so the padding after a caption changes
none of its features, and every loss masks the padding's own. A 20-token caption in a 48-token
context spends more than half its tower's work on that padding. Sorted by length and split
into groups, each encoded only as long as its longest caption, a batch gets the same features
and gradients for a fraction of the work (`model.text_length_buckets`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["caption_lengths", "encode_in_length_buckets"]


def caption_lengths(text: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[N]: one past the position of each caption's last token that is not padding."""
    positions = torch.arange(1, text.shape[1] + 1, device=text.device)
    return ((text != pad_token_id) * positions).amax(dim=1)


def encode_in_length_buckets(
    text: torch.Tensor,
    pad_token_id: int,
    buckets: int,
    encode: Callable[[torch.Tensor, int], tuple[torch.Tensor, ...]],
) -> tuple[torch.Tensor, ...]:
    """`encode` computed on `buckets` groups of captions of similar length.

    `encode(rows, cut)` encodes the captions `text[rows, :cut]` (it gets the rows, not the ids, so
    that it can slice what it computed once for the whole batch, such as the token embeddings) and
    returns a tuple of pooled [n, D] and per-token [n, cut, D] tensors. Per-token outputs come
    back padded with zeros to `text`'s length, in `text`'s order.
    """
    length = text.shape[1]
    lengths = caption_lengths(text, pad_token_id)
    order = torch.argsort(lengths, stable=True)
    groups = [group for group in order.tensor_split(min(buckets, len(order))) if len(group)]
    # a group's longest caption is its last; one host sync for every group's length
    cuts = [max(int(n), 1) for n in lengths[torch.stack([group[-1] for group in groups])].tolist()]
    parts = [encode(group, cut) for group, cut in zip(groups, cuts, strict=True)]
    restore = torch.argsort(order)
    outputs = []
    for pieces in zip(*parts, strict=True):
        if pieces[0].dim() == 3:
            pieces = [F.pad(p, (0, 0, 0, length - p.shape[1])) for p in pieces]
        outputs.append(torch.cat(pieces)[restore])
    return tuple(outputs)
