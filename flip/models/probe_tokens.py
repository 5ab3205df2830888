"""Which blocks of a ViT image tower the token probe reads, and the vectors it reads there.

FLIP's and FaRL's attribute heads do not look at the pooled embedding: they read several
blocks' tokens, summarised per block by the class token and the mean and max of the patch
tokens. FLIP's released probe (ddw2AIGROUP2CQUPT/FLIP, models/mm.py with
`intermediate_transformer_output: [4, 6, 8]`) keeps the outputs of the 4th, 6th and 8th block
(1-based: hidden states after those blocks, before any final norm) and the last block's output
after the post-LayerNorm: four entries, twelve vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

FINAL = "final"  # the last block's output after the tower's post-LayerNorm (ln_post)
VECTORS_PER_BLOCK = ("cls", "mean", "max")  # the order of the three vectors of each entry
FLIP_BLOCKS_OF_12 = (4, 6, 8)


def default_probe_blocks(depth: int) -> list[int | str]:
    """FLIP's blocks 4, 6, 8 (of 12) at the same relative depths, then the final normed output.

    A shallow tower may map two positions to one block; it is read once.
    """
    blocks: list[int | str] = []
    for block in FLIP_BLOCKS_OF_12:
        scaled = max(1, min(depth, int(block * depth / 12 + 0.5)))
        if scaled not in blocks:
            blocks.append(scaled)
    return [*blocks, FINAL]


def resolve_probe_blocks(blocks: Sequence[int | str] | None, depth: int) -> list[int | str]:
    """`blocks` checked against a tower of `depth` blocks (1-based numbers or "final"), or the default."""
    if blocks is None:
        return default_probe_blocks(depth)
    resolved: list[int | str] = []
    for block in blocks:
        ok = block == FINAL or (
            isinstance(block, int) and not isinstance(block, bool) and 1 <= block <= depth
        )
        if not ok:
            raise ValueError(
                f"token-probe block {block!r}: give 1-based block numbers 1..{depth} (a block's raw "
                f"output) or {FINAL!r} (the last block after the post-LayerNorm), e.g. "
                f"{default_probe_blocks(depth)}"
            )
        if block in resolved:
            raise ValueError(f"token-probe block {block!r} is listed twice in {list(blocks)}")
        resolved.append(block)
    if not resolved:
        raise ValueError(f"the token probe needs at least one block, e.g. {default_probe_blocks(depth)}")
    return resolved
