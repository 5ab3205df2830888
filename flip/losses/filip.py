"""FILIP's token-wise late interaction (Yao et al., 2021) as a contrastive loss.

For projected, L2-normalised tokens x_I[i, k] (image i) and x_T[j, r] (caption j):

    image->text  s_I(i, j) = mean over valid k of  max over valid r of <x_I[i, k], x_T[j, r]>
    text->image  s_T(i, j) = mean over valid r of  max over valid k of <x_T[j, r], x_I[i, k]>

Both come from the same B_img x B_txt x N_img x N_txt similarity tensor, which is far too
large to keep (4 GB in fp32 at B=256 with ViT-B/16 and 77 text tokens, before autograd
copies it). `filip_similarity` computes it in blocks of pairs, reduces each block to the two
B x B similarities at once and keeps nothing else: the backward recomputes each block, routes
the gradient to the arg-max token of every max, and multiplies by the tokens. Beyond the B x B
outputs, peak memory is one block whatever the batch size. A similarity computed in one block
keeps its arg-maxes for backward instead, far smaller than the block (`_keeps_arg_maxes`).

Blocks are sized from the batch and the memory free on the device (`chunk_size="auto"`): the
largest that fit. A constant size makes the number of blocks grow with the square of the global
batch (at 256 per GPU x 32 GPUs, 32-pair blocks are thousands of small kernels per step), while
the whole similarity of a moderate batch fits in one.

Padding is exact: padded tokens are set to -inf before every max (a pad whose feature is 0
would otherwise score 0 and beat every negative true similarity) and do not count in any
mean. A side with no valid token at all contributes 0 instead of -inf or NaN.
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import ClassVar

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from flip.losses.clip import check_rank, contrastive_labels, symmetric_cross_entropy
from flip.losses.distributed import gather_features, gather_mask
from flip.losses.foils import (
    FoilChoiceSchedule,
    choice_loss,
    foil_rows,
    foil_token_similarity,
    reads_foils,
    with_foil_columns,
)
from flip.models.outputs import EncoderOutput

_NEG_INF = float("-inf")


def _valid_counts(mask: torch.Tensor | None, batch: int, tokens: int, ref: torch.Tensor) -> torch.Tensor:
    """Tokens each sample averages over; at least 1, so an empty side yields 0, not NaN."""
    if mask is None:
        return ref.new_full((batch,), float(tokens))
    return mask.sum(1).clamp_min(1).to(ref.dtype)


def _block(
    image: torch.Tensor, text: torch.Tensor, image_pad: torch.Tensor | None, text_pad: torch.Tensor | None
) -> torch.Tensor:
    """[ci, Ni, cj, Nt] token similarities of a block of pairs, padding at -inf (one matmul)."""
    (ci, ni, d), (cj, nt, _) = image.shape, text.shape
    sim = (image.reshape(ci * ni, d) @ text.reshape(cj * nt, d).T).view(ci, ni, cj, nt)
    if text_pad is not None:
        sim.masked_fill_(text_pad[None, None], _NEG_INF)
    if image_pad is not None:
        sim.masked_fill_(image_pad[:, :, None, None], _NEG_INF)
    return sim


def _zero_empty(maxima: torch.Tensor) -> torch.Tensor:
    """A max over nothing but padding is -inf: it counts as 0 (pad rows are not in the mean anyway)."""
    return maxima.masked_fill_(maxima.isneginf(), 0.0)


def _part(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if mask is None else mask[rows]


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


AUTO = "auto"
BLOCK_MEMORY_FRACTION = 0.25  # of the free memory, for one block: backward also holds its arg-maxes
_CPU_FALLBACK_BYTES = 1 << 30
# forward's arg-maxes of a one-block similarity are kept for backward up to this size (`_keeps_arg_maxes`)
KEEP_ARG_MAXES_BYTES = 256 << 20


def free_memory(device: torch.device) -> int:
    """Bytes that tensors on `device` could still take: what the CUDA driver reports free plus what
    torch's allocator holds unused; on the CPU, the memory the OS reports available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return _CPU_FALLBACK_BYTES


def block_shape(
    rows: int, row_tokens: int, cols: int, col_tokens: int, element_size: int, budget_bytes: int
) -> tuple[int, int]:
    """(row, column) pairs per block: the fewest blocks whose [rows, Ni, cols, Nt] similarity each
    fits in `budget_bytes` (the whole matrix when it fits), never less than one pair."""
    pairs = max(1, budget_bytes // max(1, row_tokens * col_tokens * element_size))
    if rows * cols <= pairs:
        return max(1, rows), max(1, cols)  # an empty side still gets a valid (empty) loop
    best, fewest, least_possible = (1, 1), rows * cols, -(-rows * cols // pairs)
    for row_blocks in range(1, rows + 1):  # fewer row passes first: ties keep the longer rows
        row_chunk = -(-rows // row_blocks)
        col_chunk = min(cols, pairs // row_chunk)
        if col_chunk < 1:
            continue
        count = row_blocks * -(-cols // col_chunk)
        if count < fewest:
            best, fewest = (row_chunk, col_chunk), count
        if fewest == least_possible:
            break
    return best


def _resolve_blocks(chunk_size: int | str, image: torch.Tensor, text: torch.Tensor) -> tuple[int, int]:
    if chunk_size != AUTO:
        return chunk_size, chunk_size
    (bi, ni, _), (bt, nt, _) = image.shape, text.shape
    budget = int(free_memory(image.device) * BLOCK_MEMORY_FRACTION)
    return block_shape(bi, ni, bt, nt, torch.empty((), dtype=image.dtype).element_size(), budget)


def check_chunk_size(chunk_size: int | str) -> None:
    if chunk_size != AUTO and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"chunk_size must be 'auto' (blocks sized from the batch and free memory) or an integer "
            f">= 1 (pairs per block side), got {chunk_size!r}"
        )


def _autocast_state(device_type: str) -> dict:
    """The autocast state forward ran under on `device_type`, as `torch.autocast` arguments.

    Backward recomputes each block's similarities and routes the gradient to their arg-maxes:
    it must compute them as forward did. Autograd runs backward outside the autocast context,
    and `torch.amp.custom_fwd` restores the state on one device type only (written for CUDA,
    it left CPU bf16 backward recomputing in float32, where near-ties pick other tokens).
    """
    enabled = torch.is_autocast_enabled(device_type)
    return {"device_type": device_type, "dtype": torch.get_autocast_dtype(device_type), "enabled": enabled}


def _max_over(sim: torch.Tensor, dim: int, keep: bool) -> tuple[torch.Tensor, tuple | None]:
    """Maxima of a block over `dim` (empty sides at 0); with `keep`, also (arg-max, empty) for backward."""
    if not keep:
        return _zero_empty(sim.amax(dim)), None
    best, at = sim.max(dim)
    empty = best.isneginf()
    return best.masked_fill_(empty, 0.0), (at, empty)


def _keeps_arg_maxes(blocks: int, image: torch.Tensor, text: torch.Tensor) -> bool:
    """Whether forward keeps its arg-maxes for backward instead of backward recomputing the block.

    Only for a similarity computed in one block, and only while the arg-maxes (an int64 and a
    bool per max, [Bi, Ni, Bt] and [Bi, Bt, Nt]) stay under `KEEP_ARG_MAXES_BYTES`: they live
    until backward, where the block itself was freed at once. Large chunked batches recompute.
    """
    (bi, ni, _), (bt, nt, _) = image.shape, text.shape
    return blocks == 1 and bi * bt * (ni + nt) * 9 <= KEEP_ARG_MAXES_BYTES


class _LateInteraction(torch.autograd.Function):
    """Blockwise s_I / s_T; backward routes the gradient to the arg-max token of every max.

    The arg-maxes come from forward when the similarity was one block (`_keeps_arg_maxes`), and
    otherwise from each block recomputed; see the module docstring.
    """

    @staticmethod
    def forward(ctx, image, text, image_mask, text_mask, chunk_size, want_i2t, want_t2i):
        ctx.autocast = _autocast_state(image.device.type)
        image, text = image.contiguous(), text.contiguous()
        (bi, ni, _), (bt, nt, _) = image.shape, text.shape
        image_pad = None if image_mask is None else ~image_mask
        text_pad = None if text_mask is None else ~text_mask
        n_img, n_txt = _valid_counts(image_mask, bi, ni, image), _valid_counts(text_mask, bt, nt, image)
        i2t = image.new_empty(bi, bt) if want_i2t else None
        t2i = image.new_empty(bi, bt) if want_t2i else None
        row_chunk, col_chunk = _resolve_blocks(chunk_size, image, text)
        row_blocks, col_blocks = _chunks(bi, row_chunk), _chunks(bt, col_chunk)
        keep = _keeps_arg_maxes(len(row_blocks) * len(col_blocks), image, text)
        kept = {}  # dim of the max -> (arg-max, empty), for backward
        for rows in row_blocks:
            for cols in col_blocks:
                sim = _block(image[rows], text[cols], _part(image_pad, rows), _part(text_pad, cols))
                ctx.sim_dtype = sim.dtype  # bfloat16 under autocast: backward's block gradient too
                if want_i2t:
                    best, kept[3] = _max_over(sim, 3, keep)
                    i2t[rows, cols] = best.to(i2t.dtype).sum(1) / n_img[rows, None]
                if want_t2i:
                    best, kept[1] = _max_over(sim, 1, keep)
                    t2i[rows, cols] = best.to(t2i.dtype).sum(2) / n_txt[None, cols]
                del sim  # free the block before the next one is allocated
        kept = {dim: pair for dim, pair in kept.items() if pair is not None}
        ctx.save_for_backward(
            image, text, image_mask, text_mask, *(t for pair in kept.values() for t in pair)
        )
        ctx.blocks, ctx.want, ctx.kept_dims = (row_chunk, col_chunk), (want_i2t, want_t2i), tuple(kept)
        return tuple(s for s in (i2t, t2i) if s is not None)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        with torch.autocast(**ctx.autocast):  # a recomputed block must equal forward's
            return _LateInteraction._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        image, text, image_mask, text_mask, *kept_tensors = ctx.saved_tensors
        kept = {dim: tuple(kept_tensors[2 * i : 2 * i + 2]) for i, dim in enumerate(ctx.kept_dims)}
        (bi, ni, d), (bt, nt, _) = image.shape, text.shape
        grads = iter(grads)
        g_i2t, g_t2i = (next(grads) if want else None for want in ctx.want)
        # the 1/n of each mean, folded into the incoming gradient once
        if g_i2t is not None:
            g_i2t = (g_i2t / _valid_counts(image_mask, bi, ni, image)[:, None]).to(image.dtype)
        if g_t2i is not None:
            g_t2i = (g_t2i / _valid_counts(text_mask, bt, nt, image)[None, :]).to(image.dtype)
        need_image, need_text = ctx.needs_input_grad[:2]
        d_image = torch.zeros_like(image) if need_image else None
        d_text = torch.zeros_like(text) if need_text else None
        image_pad = None if image_mask is None else ~image_mask
        text_pad = None if text_mask is None else ~text_mask
        for rows in _chunks(bi, ctx.blocks[0]):
            for cols in _chunks(bt, ctx.blocks[1]):
                img, txt = image[rows], text[cols]
                if kept:  # one block, whose arg-maxes forward kept
                    grad = img.new_zeros(img.shape[0], ni, txt.shape[0], nt, dtype=ctx.sim_dtype)
                    arg_maxes = kept
                else:
                    grad = _block(img, txt, _part(image_pad, rows), _part(text_pad, cols))
                    wanted = [dim for dim, g in ((3, g_i2t), (1, g_t2i)) if g is not None]
                    arg_maxes = {dim: _max_over(grad, dim, keep=True)[1] for dim in wanted}
                    grad.zero_()  # the block's buffer is reused for its gradient
                for dim, (at, empty) in arg_maxes.items():
                    # d s_I(i,j) / d sim[i,k,j,r] = 1/n_i at r = argmax over r, k valid (dim 3);
                    # d s_T(i,j) / d sim[i,k,j,r] = 1/n_j at k = argmax over k, r valid (dim 1)
                    weight = g_i2t[rows, None, cols] if dim == 3 else g_t2i[rows, cols, None]
                    weight = weight.masked_fill(empty, 0.0).to(grad.dtype)  # bfloat16 under autocast
                    grad.scatter_add_(dim, at.unsqueeze(dim), weight.unsqueeze(dim))
                grad = grad.view(img.shape[0] * ni, txt.shape[0] * nt)
                if need_image:
                    d_image[rows] += (grad @ txt.reshape(-1, d)).view_as(img)
                if need_text:
                    d_text[cols] += (grad.T @ img.reshape(-1, d)).view_as(txt)
                del grad
        return d_image, d_text, None, None, None, None, None


def filip_similarity(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    chunk_size: int | str = AUTO,
    i2t: bool = True,
    t2i: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(s_I, s_T), each [B_img, B_txt] with s[i, j] for image i and caption j; None if not asked.

    Masks are bool [B, N], True for tokens that take part. `chunk_size`: pairs per block side
    (peak extra memory about chunk_size^2 * N_img * N_txt elements), or "auto": the largest
    blocks that take at most a quarter of the device's free memory. The result is the same.
    """
    check_chunk_size(chunk_size)
    if not (i2t or t2i):
        return None, None
    image_mask, text_mask = (None if m is None else m.bool() for m in (image_mask, text_mask))
    out = iter(_LateInteraction.apply(image_tokens, text_tokens, image_mask, text_mask, chunk_size, i2t, t2i))
    return (next(out) if i2t else None), (next(out) if t2i else None)


def _ceil_fraction(count: torch.Tensor | int, fraction: float) -> torch.Tensor | int:
    """ceil(count * fraction), robust to 0.1 * 30 = 3.0000000000000004."""
    if isinstance(count, int):
        return math.ceil(count * fraction - 1e-9)
    return torch.ceil(count.double() * fraction - 1e-9).long()


@torch.no_grad()
def own_pair_scores(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    image_mask: torch.Tensor | None,
    text_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's best similarity with the valid tokens of its own pair: [B, N_img], [B, N_txt]."""
    sim = torch.einsum("bkd,brd->bkr", image_tokens, text_tokens)
    if text_mask is not None:
        sim = sim.masked_fill(~text_mask[:, None, :], _NEG_INF)
    if image_mask is not None:
        sim = sim.masked_fill(~image_mask[:, :, None], _NEG_INF)
    return sim.amax(2), sim.amax(1)


def keep_top_tokens(
    tokens: torch.Tensor, mask: torch.Tensor | None, scores: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ceil(fraction * n_valid) best-scoring valid tokens of every sample.

    Shapes stay static (ceil(fraction * N) slots, the rest masked out) so that every rank
    gathers tensors of one size whatever its captions' lengths.
    """
    batch, n, dim = tokens.shape
    k = max(1, _ceil_fraction(n, fraction))
    order = (scores if mask is None else scores.masked_fill(~mask, _NEG_INF)).topk(k, dim=1).indices
    selected = tokens.gather(1, order[..., None].expand(batch, k, dim))
    if mask is None:  # every sample keeps exactly k tokens
        return selected, None
    keep = _ceil_fraction(mask.sum(1), fraction).clamp(1, k)
    return selected, mask.gather(1, order) & (torch.arange(k, device=mask.device) < keep[:, None])


class FilipLoss(nn.Module):
    """InfoNCE over FILIP late-interaction similarities, averaged over both directions.

    Text tokens: the model's `text_token_mask` marks the tokens that can carry caption
    information (`FlipModel.informative_text_tokens`): it already leaves out padding and the
    start token of open_clip's causal text transformer, whose feature is the same vector for
    every caption and would add a caption-independent term to s_T, and it keeps a
    bidirectional tower's [CLS], which reads the whole caption. `exclude_sot=True` also drops
    position 0 of a mask that came from elsewhere (features not made by FlipModel).

    `topk_fraction` keeps, before the cross-rank gather, the ceil(fraction * n_valid) tokens of
    each sample whose best similarity with its own pair's tokens is highest (FILIP keeps ~25%
    to cut bandwidth). FILIP scores a token against all texts of the local worker; the own-pair
    score costs O(B) instead of O(B^2) and depends on nothing but the pair, so the selection -
    and the loss - do not change with how the global batch is sharded over ranks. Norms cannot
    rank L2-normalised tokens. Selection is not differentiated; the kept tokens are.

    `local_loss` / `gather_with_grad` mean what they do in ClipLoss (token features and masks
    are gathered instead of pooled features; labels offset by rank * B_local); so does
    `foil_choice_weight` and its schedule (the choice among foils scored with FILIP's similarity).
    """

    requires_tokens: ClassVar[bool] = True
    uses_foils: ClassVar[bool] = True  # data.hard_negatives: foils are extra negatives here

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
        topk_fraction: float | None = None,
        chunk_size: int | str = AUTO,
        exclude_sot: bool = False,
        foil_choice_weight: float = 0.0,
        foil_choice_start_step: int = 0,
        foil_choice_ramp_steps: int = 0,
    ) -> None:
        super().__init__()
        check_rank(rank, world_size)
        self.foil_choice = FoilChoiceSchedule(
            foil_choice_weight, foil_choice_start_step, foil_choice_ramp_steps
        )
        self.step = 0  # the trainer's optimizer step (`at_step`): the foil choice weight follows it
        if topk_fraction is not None and not 0.0 < topk_fraction <= 1.0:
            raise ValueError(
                f"topk_fraction must be in (0, 1] or None (keep all tokens), got {topk_fraction}"
            )
        check_chunk_size(chunk_size)
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size
        self.topk_fraction, self.chunk_size, self.exclude_sot = topk_fraction, chunk_size, exclude_sot

    def at_step(self, step: int) -> None:
        """Called by the training module before each training step's loss (the foil choice schedule)."""
        self.step = step

    def reads_foil_tokens(self, foil_mask: torch.Tensor | None) -> bool:
        """Whether this step's loss reads the foils' token features (`reads_foils`, after `at_step`):
        the training module has the model encode them only then. Statements, for a term whose
        choice is off, are per-slot token features no loss reads, copied into every slot and
        back in backward."""
        return reads_foils(foil_mask, self.foil_choice.at(self.step))

    def text_mask(self, text_tokens: torch.Tensor, text_token_mask: torch.Tensor | None) -> torch.Tensor:
        mask = (
            torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=text_tokens.device)
            if text_token_mask is None
            else text_token_mask.bool().clone()
        )
        if self.exclude_sot:
            mask[:, 0] = False
        return mask

    def select_tokens(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        image_mask: torch.Tensor | None,
        text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        image_scores, text_scores = own_pair_scores(image_tokens, text_tokens, image_mask, text_mask)
        image_tokens, image_mask = keep_top_tokens(image_tokens, image_mask, image_scores, self.topk_fraction)
        text_tokens, text_mask = keep_top_tokens(text_tokens, text_mask, text_scores, self.topk_fraction)
        return image_tokens, image_mask, text_tokens, text_mask

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        text_token_mask: torch.Tensor | None = None,
        image_token_mask: torch.Tensor | None = None,
        output_dict: bool = False,
        foil_tokens: torch.Tensor | None = None,
        foil_token_mask: torch.Tensor | None = None,
        foil_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """`foil_tokens` [B, F, Nt, D] (`foil_token_mask` [B, F, Nt], `foil_mask` [B, F]): attribute
        foils of each caption, token-level extra negatives in their own image's row only
        (`flip.losses.foils`), scored with the image tokens the batch's pairs are scored with.
        With `foil_mask` [B, G, V] they are statement groups, scored by the choice term alone."""
        text_mask, image_mask = self.text_mask(text_tokens, text_token_mask), image_token_mask
        if image_mask is not None:
            image_mask = image_mask.bool()
        if self.topk_fraction is not None:
            image_tokens, image_mask, text_tokens, text_mask = self.select_tokens(
                image_tokens, text_tokens, image_mask, text_mask
            )
        sim = partial(filip_similarity, chunk_size=self.chunk_size)
        if self.world_size > 1:
            all_image, all_text = gather_features(
                image_tokens,
                text_tokens,
                local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad,
                rank=self.rank,
                world_size=self.world_size,
            )
            all_image_mask = None if image_mask is None else gather_mask(image_mask, self.world_size)
            all_text_mask = gather_mask(text_mask, self.world_size)
            if self.local_loss:
                i2t, _ = sim(image_tokens, all_text, image_mask, all_text_mask, t2i=False)
                _, t2i = sim(all_image, text_tokens, all_image_mask, text_mask, i2t=False)
            else:
                i2t, t2i = sim(all_image, all_text, all_image_mask, all_text_mask)
        else:
            i2t, t2i = sim(image_tokens, text_tokens, image_mask, text_mask)
        per_image, per_text = logit_scale * i2t, logit_scale * t2i.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        weight = self.foil_choice.at(self.step)
        if foil_tokens is not None and not reads_foils(foil_mask, weight):
            foil_tokens = None
        if foil_tokens is not None:
            foil_logits, foil_mask = self._foil_logits(
                image_tokens, image_mask, foil_tokens, foil_token_mask, foil_mask, logit_scale, logit_bias
            )
            per_image = with_foil_columns(per_image, foil_logits, foil_mask)
        labels = contrastive_labels(
            per_image.shape[0], per_image.device, self.rank, self.world_size, self.local_loss
        )
        loss = symmetric_cross_entropy(per_image, per_text, labels)
        if foil_tokens is not None and weight:
            loss = loss + weight * choice_loss(per_image, labels, foil_logits, foil_mask)
        return {"filip_loss": loss} if output_dict else loss

    def _foil_logits(self, image_tokens, image_mask, foil_tokens, foil_token_mask, foil_mask, scale, bias):
        b, f, n = foil_tokens.shape[:3]
        token_mask = self.text_mask(
            foil_tokens.reshape(b * f, n, -1), foil_token_mask.reshape(b * f, n)
        ).view(b, f, n)
        if image_mask is None:  # gathered below as a mask, like the others
            image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device)
        rows, foils, mask, image_mask, token_mask = foil_rows(
            image_tokens,
            foil_tokens,
            foil_mask,
            image_mask,
            token_mask,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )
        logits = scale * foil_token_similarity(rows, image_mask, foils, token_mask)
        if bias is not None:
            logits = logits + bias
        return logits.masked_fill(~mask.flatten(1).bool(), float("-inf")), mask

    def loss_from_outputs(self, outputs: EncoderOutput) -> torch.Tensor:
        if outputs.image_tokens is None or outputs.text_tokens is None:
            raise ValueError(
                "FilipLoss needs token features, but the EncoderOutput has none: run the model with "
                "return_tokens=True (the training module does so when loss.requires_tokens is True)"
            )
        return self(
            outputs.image_tokens,
            outputs.text_tokens,
            outputs.logit_scale,
            outputs.logit_bias,
            text_token_mask=outputs.text_token_mask,
            image_token_mask=outputs.image_token_mask,
            foil_tokens=outputs.foil_text_tokens,
            foil_token_mask=outputs.foil_text_token_mask,
            foil_mask=outputs.foil_mask,
        )
