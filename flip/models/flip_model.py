"""An open_clip model plus what it takes to feed it: tokenizer, transforms and token features.

open_clip returns pooled embeddings only; FILIP-style losses need the projected per-token
features as well, computed in the same forward pass so that no tower runs twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn
from torch.utils.checkpoint import checkpoint

from flip.models.foil_prefix import (
    attend_mask,
    block_keys_values,
    first_differences,
    shares_foil_prefixes,
    split_heads,
    suffix_block,
    suffixes,
    tokens_with_prefix,
)
from flip.models.fusion import BertCrossFusion, ItmFusion, build_fusion
from flip.models.hf_text import hf_text_with_tokens
from flip.models.length_buckets import encode_in_length_buckets
from flip.models.outputs import EncoderOutput
from flip.models.probe_tokens import FINAL, resolve_probe_blocks

# CLIP caps the learned inverse temperature at 100. Training also clamps the parameter after each
# step; clamping here too keeps the cap where the parameter cannot be written (DeepSpeed keeps
# master weights of its own).
MAX_LOGIT_SCALE = math.log(100)


def _length_buckets(buckets: Any, clip: nn.Module) -> int:
    """`model.text_length_buckets`, checked: it is exact only where padding cannot reach a
    caption's features: a Hugging Face tower (its attention and poolers mask the padding), or
    open_clip's causal tower pooling at the end-of-text token or the first."""
    if buckets is None:
        return 0
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 0:
        raise ValueError(
            f"model.text_length_buckets={buckets!r}; accepted: null or 0 (off), or the number of "
            f"groups of similar length each batch's captions are encoded in, e.g. 4"
        )
    if buckets == 0:
        return 0
    if isinstance(getattr(clip, "text", None), HFTextEncoder):
        return buckets
    pool = getattr(clip, "text_pool_type", None)
    if not isinstance(clip, CLIP) or clip.attn_mask is None or pool not in ("argmax", "eos", "first"):
        raise ValueError(
            f"model.text_length_buckets={buckets} needs a Hugging Face text tower or open_clip's causal "
            f"text transformer pooled at the end-of-text token (text_cfg pool_type argmax or eos; here "
            f"{_text_tower(clip)}): elsewhere a caption's features read its padding. Set "
            f"model.text_length_buckets=null"
        )
    return buckets


def _foil_prefix_sharing(setting: Any, clip: nn.Module) -> bool:
    """`model.foil_prefix_sharing`, checked: reusing a caption's states for its foils is exact only
    in open_clip's causal text transformer pooled at the end-of-text token."""
    if not isinstance(setting, bool):
        raise ValueError(
            f"model.foil_prefix_sharing={setting!r}; accepted: true (foils encoded from their first "
            f"changed token) or false (each foil encoded whole)"
        )
    if setting and not shares_foil_prefixes(clip):
        raise ValueError(
            f"model.foil_prefix_sharing=true needs open_clip's causal text transformer pooled at the "
            f"end-of-text token (text_cfg pool_type argmax or eos) with open_clip's residual blocks "
            f"(here {_text_tower(clip)}): elsewhere a foil's first states are not its caption's. Set "
            f"model.foil_prefix_sharing=false"
        )
    return setting


def _text_tower(clip: nn.Module) -> str:
    """What a text-tower setting's error says of the tower it was refused for."""
    tower = type(getattr(clip, "text", clip)).__name__
    causal = getattr(clip, "attn_mask", None) is not None
    return f"{tower}, causal: {causal}, pool_type: {getattr(clip, 'text_pool_type', None)}"


def _pad_token_id(tokenizer: Any) -> int:
    """open_clip's BPE tokenizer pads with 0; Hugging Face tokenizers say what they pad with."""
    hf = getattr(tokenizer, "tokenizer", None)
    pad = getattr(hf, "pad_token_id", None)
    return 0 if pad is None else int(pad)


class FlipModel(nn.Module):
    """The trained object: `encode_image`, `encode_text`, `tokenizer`, `preprocess` as in open_clip."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable[..., torch.Tensor],
        preprocess_train: Callable,
        preprocess: Callable,
        config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.preprocess_train = preprocess_train
        self.preprocess = preprocess
        self.config = config
        self.pad_token_id = _pad_token_id(tokenizer)
        self.text_length_buckets = _length_buckets(config.get("text_length_buckets"), clip)
        self.foil_prefix_sharing = _foil_prefix_sharing(config.get("foil_prefix_sharing", False), clip)
        # image-text matching (model.fusion; flip.models.fusion): None for a contrastive-only model
        self.fusion: ItmFusion | BertCrossFusion | None = None
        if config.get("fusion") is not None:
            text = getattr(clip, "text", None)
            bert = text.config if isinstance(text, HFTextEncoder) else None
            self.fusion = build_fusion(config["fusion"], *self._hidden_widths(), bert_config=bert)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The log temperature as a 0-dim view (it is stored 1-d under ZeRO-3, see `prepare_for_zero3`)."""
        return self.clip.logit_scale.view(())

    @property
    def logit_bias(self) -> torch.Tensor | None:
        bias = getattr(self.clip, "logit_bias", None)
        return None if bias is None else bias.view(())

    def prepare_for_zero3(self, owner: nn.Module) -> list[str]:
        """Make the towers trainable under DeepSpeed ZeRO-3, before the engine partitions them.

        ZeRO-3 gathers a module's parameters only while that module's forward (and backward)
        runs. FLIP computes features through open_clip's parts, to get token features in one
        pass, so the parameters that `clip` and `clip.visual` hold directly (embeddings,
        projections, temperature) are registered as external parameters of `owner`: the
        outermost module whose forward runs and returns tensors (under Lightning, the
        LightningModule, whose forward is the training step). DeepSpeed also cannot broadcast or
        partition 0-dim parameters, so those are stored as 1-element tensors (`logit_scale` and
        `logit_bias` read them back as 0-dim). Returns the names of the reshaped parameters.
        """
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        reshaped = []
        for name, param in self.named_parameters():
            if param.dim() == 0:
                param.data = param.data.reshape(1)
                reshaped.append(name)
        for holder in (self.clip, getattr(self.clip, "visual", None)):
            for param in [] if holder is None else holder.parameters(recurse=False):
                register_external_parameter(owner, param)
        return reshaped

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if not self.text_length_buckets:
            return self.clip.encode_text(text, normalize=normalize)
        features = self._text_with_tokens(text, tokens=False)[0]
        return F.normalize(features, dim=-1) if normalize else features

    def query(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Moved: models sit below evaluation and do not import it; ask `flip.query(model, ...)`."""
        raise AttributeError(
            "FlipModel.query(images, attributes) is now flip.query(model, images, attributes) "
            "(same arguments, model first)"
        )

    def forward(
        self,
        images: torch.Tensor,
        text: torch.Tensor,
        return_tokens: bool = False,
        foils: torch.Tensor | None = None,
        foil_mask: torch.Tensor | None = None,
        foil_tokens: bool | None = None,
    ) -> EncoderOutput:
        """Features of a batch; with `foils` [B, F, L] (`data.hard_negatives`) and their `foil_mask`
        [B, F], the foil fields too: each foil encoded from where it leaves its caption with
        `model.foil_prefix_sharing` (`flip.models.foil_prefix`), else whole (`encode_foils`).
        `foil_tokens` False leaves the foils' token fields out where the batch's are in (None:
        as `return_tokens`): no loss reads them at this step."""
        foil_tokens = return_tokens if foil_tokens is None else foil_tokens and return_tokens
        share = foils is not None and self.foil_prefix_sharing
        layers = 2 * len(self.clip.transformer.resblocks) if share else 0
        extra: dict[str, Any] = {}
        if return_tokens:
            image_features, image_tokens, image_hidden = self._image_with_tokens(images, hidden=True)
            encoded = self._text_with_tokens(text, hidden=True, keys_values=share)
            text_features, text_tokens, text_hidden = encoded[:3]
            extra = {
                "image_tokens": F.normalize(image_tokens, dim=-1),
                "text_tokens": F.normalize(text_tokens, dim=-1),
                "text_token_mask": self.informative_text_tokens(text),
            }
            if self.fusion is not None:  # what the ITM loss fuses, from the same pass
                extra.update(image_hidden=image_hidden, text_hidden=text_hidden, text_ids=text)
        else:
            image_features = self.encode_image(images)
            if share:
                encoded = self._text_with_tokens(text, tokens=False, keys_values=True)
                text_features, text_tokens = encoded[0], None
            else:
                text_features = self.encode_text(text)
        if foils is not None:
            mask = foil_mask
            if mask is None:
                mask = torch.ones(foils.shape[:2], dtype=torch.bool, device=foils.device)
            if share:
                caption_tokens = text_tokens if foil_tokens else None
                extra.update(self._encode_foil_suffixes(foils, mask, text, caption_tokens, encoded[-layers:]))
            else:
                extra.update(self.encode_foils(foils, foil_tokens, mask))
            extra["foil_mask"] = mask
        return EncoderOutput(
            image_features=F.normalize(image_features, dim=-1),
            text_features=F.normalize(text_features, dim=-1),
            logit_scale=self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp(),
            logit_bias=self.logit_bias,
            **extra,
        )

    def trim_foils(self, foils: torch.Tensor) -> torch.Tensor:
        """Foil token ids [..., L] cut after the last position any foil uses, where padding cannot
        change a feature (the towers `text_length_buckets` accepts) and the foils are encoded
        whole: statements fill a fraction of the context, and the token features FILIP scores
        them with, [B, F, L, D], shrink with it. Cut once per batch, before any micro-batching, so
        that every part has the same length."""
        if not self.text_length_buckets or self.foil_prefix_sharing or foils.shape[-1] < 2:
            return foils
        used = (foils != self.pad_token_id).reshape(-1, foils.shape[-1]).any(0).nonzero()
        return foils[..., : int(used.max()) + 1] if used.numel() else foils[..., :1]

    def encode_foils(
        self, foils: torch.Tensor, return_tokens: bool = False, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The `EncoderOutput` foil fields of foil token ids [B, F, L] (`data.hard_negatives`),
        each foil encoded whole, as a caption is: a foil and its caption differ only by their
        words. `forward` with `foils` gives the same fields for less work where the tower is causal.

        With `mask` [B, F] (or [B, groups, values]), only the foils that exist are encoded
        (captions with fewer foils than slots, `fraction` below 1): the others are zeros, which
        every loss masks out. Each distinct foil is encoded once: statements
        (`flip.data.foils.statements`) repeat across a batch, and a row's features depend on its
        tokens alone."""
        text, _, present = _foil_rows(foils, mask)
        distinct, copies = torch.unique(text, dim=0, return_inverse=True)
        if not return_tokens:
            encoded = {"foil_text_features": F.normalize(self.encode_text(distinct), dim=-1)}
        else:
            features, tokens = self._text_with_tokens(distinct)
            encoded = {
                "foil_text_features": F.normalize(features, dim=-1),
                "foil_text_tokens": F.normalize(tokens, dim=-1),
                "foil_text_token_mask": self.informative_text_tokens(distinct),
            }
        encoded = {name: value[copies] for name, value in encoded.items()}
        return _foil_fields(encoded, present, foils.shape)

    def _encode_foil_suffixes(
        self,
        foils: torch.Tensor,
        mask: torch.Tensor,
        captions: torch.Tensor,
        caption_tokens: torch.Tensor | None,
        keys_values: Sequence[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The foil fields (`encode_foils`), each foil's suffix run on its caption's keys and values
        `keys_values` ([N, L, W] keys then values, block after block) of the positions before."""
        clip = self.clip
        rows, owners, present = _foil_rows(foils, mask)
        starts = first_differences(rows, captions[owners])
        suffix_ids = suffixes(rows, starts, self.pad_token_id)
        blocks = clip.transformer.resblocks
        heads = [block.attn.num_heads for block in blocks]
        cast_dtype = clip.transformer.get_cast_dtype()
        context = clip.positional_embedding.shape[0]
        embedded = clip.token_embedding(suffix_ids)
        tokens = caption_tokens is not None

        def encode(group: torch.Tensor, cut: int) -> tuple[torch.Tensor, ...]:
            group_starts, own = starts[group], owners[group]
            past = int(group_starts.max())
            positions = group_starts[:, None] + torch.arange(cut, device=group.device)
            positions = positions.clamp(max=context - 1)  # past the context: padding, read by none
            x = embedded[:, :cut].index_select(0, group).to(cast_dtype)
            # a lookup, not indexing: its backward sums the many repeats of each position cheaply
            x = x + F.embedding(positions, clip.positional_embedding).to(cast_dtype)
            attend = attend_mask(group_starts, past, cut)
            for number, block in enumerate(blocks):
                keys, values = (
                    split_heads(keys_values[2 * number + i][:, :past].index_select(0, own), heads[number])
                    for i in (0, 1)
                )
                x = self._maybe_checkpoint(suffix_block, block, x, keys, values, attend)
            x = clip.ln_final(x)
            ids = suffix_ids[group, :cut]
            pooled = text_global_pool(x, ids, clip.text_pool_type, eos_token_id=clip.text_eos_id)
            return (self._project_text(pooled), *([self._project_text(x)] if tokens else []))

        buckets = max(1, self.text_length_buckets)  # suffixes differ in length more than captions
        out = encode_in_length_buckets(suffix_ids, self.pad_token_id, buckets, encode)
        encoded = {"foil_text_features": F.normalize(out[0], dim=-1)}
        if tokens:
            whole = tokens_with_prefix(caption_tokens.index_select(0, owners), out[1], starts)
            encoded["foil_text_tokens"] = F.normalize(whole, dim=-1)
            encoded["foil_text_token_mask"] = self.informative_text_tokens(rows)
        return _foil_fields(encoded, present, foils.shape)

    def _maybe_checkpoint(self, function: Callable, *args: Any) -> torch.Tensor:
        """`function(*args)`, its activations recomputed in backward when the text tower's are
        (`grad_checkpointing`)."""
        if self.clip.transformer.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def hidden_states(self, images: torch.Tensor | None = None, text: torch.Tensor | None = None) -> tuple:
        """The unprojected token states the ITM fusion reads: (image [B, Ni, Wi] or None, text
        [B, Nt, Wt] or None), for evaluation (retrieval's rerank_k)."""
        image = None if images is None else self._image_with_tokens(images, hidden=True)[2]
        words = None if text is None else self._text_with_tokens(text, hidden=True)[2]
        return image, words

    def itm_logits(
        self, image_hidden: torch.Tensor, text_hidden: torch.Tensor, text_ids: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits [B, 2] (column 1: "matches") of pairs of hidden states (`hidden_states`) and
        the caption token ids (for the padding mask)."""
        if self.fusion is None:
            raise ValueError(
                "this model has no image-text matching head (model.fusion is null): train it with "
                "loss=clip_itm or loss=itc_queue_itm, or use contrastive scores only (rerank_k=0)"
            )
        padding = text_ids == self.pad_token_id
        if isinstance(self.fusion, BertCrossFusion):  # BLIP: the caption runs through BERT again
            return self.fusion(image_hidden, text_ids, padding, self.clip.text.transformer)
        return self.fusion(image_hidden, text_hidden, padding)

    def _hidden_widths(self) -> tuple[int, int]:
        """(text width, image width) of the unprojected token states."""
        visual = self.clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"model.fusion (image-text matching) needs an open_clip VisionTransformer image tower, "
                f"not {type(visual).__name__}; set model.fusion=null or use a ViT architecture"
            )
        text = getattr(self.clip, "text", None)
        if isinstance(text, HFTextEncoder):
            return int(text.config.hidden_size), int(visual.transformer.width)
        if not isinstance(self.clip, CLIP):
            raise ValueError(
                f"model.fusion needs open_clip's text transformer or a Hugging Face text tower, not "
                f"{type(self.clip).__name__}; set model.fusion=null"
            )
        return int(self.clip.transformer.width), int(visual.transformer.width)

    def informative_text_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """True for the text tokens whose features can say something about the caption.

        Padding never does. In open_clip's causal text transformer the start token attends to
        nothing but itself, so its feature is the same vector for every caption: a token loss
        (FILIP) would score a caption-independent match. A bidirectional tower's first token
        (BERT's [CLS]) reads the whole caption and stays. The tower decides this, not the loss
        config, so a loss cannot drop [CLS] by mistake or keep a constant start token.
        """
        mask = text != self.pad_token_id
        if isinstance(self.clip, CLIP) and self.clip.attn_mask is not None:
            mask[:, 0] = False
        return mask

    def token_probe_vectors(
        self, images: torch.Tensor, blocks: Sequence[int | str] | None = None
    ) -> torch.Tensor:
        """[B, 3 * len(blocks), width]: per block the class token, the mean and the max of the patch tokens.

        `blocks` are 1-based block numbers (that block's raw output) or "final" (the last block's
        output after ln_post, over all tokens, as FLIP's probe reads it); None: FLIP's choice at
        this tower's depth (flip.models.probe_tokens). The blocks after the last one needed do
        not run.
        """
        vectors = []
        for h in self._block_tokens(images, blocks, "the token probe"):
            patches = h[:, 1:]
            vectors += [h[:, 0], patches.mean(dim=1), patches.amax(dim=1)]
        return torch.stack(vectors, dim=1)

    def patch_token_maps(
        self, images: torch.Tensor, blocks: Sequence[int | str] | None = None
    ) -> torch.Tensor:
        """[B, len(blocks), width, grid_h, grid_w]: each block's patch tokens laid out on the image's
        patch grid (the class token left out), what a dense head (parsing, landmarks) reads.

        `blocks` as for `token_probe_vectors`; the blocks after the last one needed do not run.
        """
        grid_h, grid_w = self.clip.visual.grid_size
        maps = []
        for h in self._block_tokens(images, blocks, "a dense probe"):
            patches = h[:, 1:]
            maps.append(patches.transpose(1, 2).reshape(len(h), patches.shape[-1], grid_h, grid_w))
        return torch.stack(maps, dim=1)

    def _block_tokens(
        self, images: torch.Tensor, blocks: Sequence[int | str] | None, user: str
    ) -> list[torch.Tensor]:
        """The tokens [B, 1 + patches, width] of each of `blocks` (batch first): the block's raw
        output, or for "final" the last block's after ln_post. `user` names the caller in errors."""
        visual = self.clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"{user} needs an open_clip VisionTransformer image tower (a ViT-* "
                f"architecture, e.g. ViT-B-16 or conf/model/tiny.yaml), not {type(visual).__name__}, "
                f"which exposes no tokens; use the linear_probe protocol (pooled features) for this model"
            )
        if visual.attn_pool is not None:
            raise ValueError(
                f"{user} reads the ViT's own tokens, and this tower pools them by attention "
                "(CoCa-style, ln_post over the pooler's output); use a ViT without attentional_pool, "
                "or the linear_probe protocol"
            )
        transformer = visual.transformer
        blocks = resolve_probe_blocks(blocks, len(transformer.resblocks))
        last = len(transformer.resblocks) if FINAL in blocks else max(int(b) for b in blocks)
        x = visual._embeds(images)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        kept = {last, *(b for b in blocks if b != FINAL)}
        outputs = {}
        for number, block in enumerate(transformer.resblocks[:last], start=1):
            x = block(x)
            if number in kept:
                outputs[number] = x if transformer.batch_first else x.transpose(0, 1)
        return [visual.ln_post(outputs[last]) if block == FINAL else outputs[int(block)] for block in blocks]

    def _image_with_tokens(self, images: torch.Tensor, hidden: bool = False) -> tuple[torch.Tensor, ...]:
        """Pooled and token features, projected; with `hidden`, also the tokens before the projection."""
        visual = self.clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"token features need an open_clip VisionTransformer image tower, not "
                f"{type(visual).__name__}; use a ViT architecture or a pooled-feature loss (clip, siglip)"
            )
        x = visual.transformer(visual._embeds(images))
        pooled, states = visual._pool(x)
        tokens = states
        if visual.proj is not None:
            pooled, tokens = pooled @ visual.proj, states @ visual.proj
        return (pooled, tokens, states) if hidden else (pooled, tokens)

    def _text_with_tokens(
        self, text: torch.Tensor, hidden: bool = False, tokens: bool = True, keys_values: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Pooled and token features, projected; with `hidden`, also the tokens before the
        projection; without `tokens`, the pooled features alone. With `keys_values` (open_clip's
        tower only), then each block's keys and values [N, L, W] (what a foil's suffix reads,
        `flip.models.foil_prefix`)."""
        clip = self.clip
        if isinstance(getattr(clip, "text", None), HFTextEncoder):
            if not self.text_length_buckets:
                return hf_text_with_tokens(clip.text, text, hidden=hidden)
            return encode_in_length_buckets(
                text, self.pad_token_id, self.text_length_buckets,
                lambda rows, cut: hf_text_with_tokens(clip.text, text[rows, :cut], hidden=hidden),
            )  # fmt: skip
        if not isinstance(clip, CLIP):
            raise ValueError(
                f"token features need open_clip's built-in text transformer, not {type(clip).__name__}; "
                f"use a pooled-feature loss (clip, siglip) with this text tower"
            )

        cast_dtype = clip.transformer.get_cast_dtype()

        def encode(ids: torch.Tensor, embedded: torch.Tensor) -> tuple[torch.Tensor, ...]:
            length = ids.shape[1]  # the context length, or a length bucket's
            x = embedded.to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
            mask = None if clip.attn_mask is None else clip.attn_mask[:length, :length]
            cached: list[torch.Tensor] = []
            if keys_values:  # block by block, keeping what each computed its attention from
                for block in clip.transformer.resblocks:
                    cached += block_keys_values(block, x)
                    x = self._maybe_checkpoint(partial(block, attn_mask=mask), x)
            else:
                x = clip.transformer(x, attn_mask=mask)
            x = clip.ln_final(x)
            pooled = text_global_pool(x, ids, clip.text_pool_type, eos_token_id=clip.text_eos_id)
            out = (self._project_text(pooled), *([self._project_text(x)] if tokens else []))
            return (*out, x, *cached) if hidden else (*out, *cached)

        # one lookup for the whole batch, sliced per bucket: each lookup's backward writes a dense
        # gradient the size of the vocabulary's table, so one per bucket multiplied that cost
        embedded = clip.token_embedding(text)
        if not self.text_length_buckets:
            return encode(text, embedded)
        return encode_in_length_buckets(
            text, self.pad_token_id, self.text_length_buckets,
            lambda rows, cut: encode(text[rows, :cut], embedded[rows, :cut]),
        )  # fmt: skip

    def _project_text(self, features: torch.Tensor) -> torch.Tensor:
        projection = self.clip.text_projection
        if isinstance(projection, nn.Linear):
            return projection(features)
        return features if projection is None else features @ projection


def _foil_rows(
    foils: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The foils [B, F, L] to encode, as rows [N, L], each row's caption (its index in the batch),
    and where the rows go among the B * F slots (None: every slot, in order). With `mask`
    [B, F], only the foils that exist, and at least one row so that a batch without foils keeps
    the outputs' shapes."""
    batch, count, length = foils.shape
    rows = foils.reshape(batch * count, length)
    owners = torch.arange(batch, device=foils.device).repeat_interleave(count)
    present = None if mask is None or bool(mask.all()) else mask.reshape(-1).nonzero().squeeze(1)
    if present is None:
        return rows, owners, None
    present = present if present.numel() else present.new_zeros(1)
    return rows[present], owners[present], present


def _foil_fields(
    encoded: dict[str, torch.Tensor], present: torch.Tensor | None, shape: torch.Size
) -> dict[str, torch.Tensor]:
    """Encoded foil rows (`_foil_rows`) back in their [B, F, ...] slots, zeros where none was."""
    batch, count = shape[0], shape[1]
    if present is not None:
        encoded = {name: _scatter_rows(value, present, batch * count) for name, value in encoded.items()}
    return {name: value.view(batch, count, *value.shape[1:]) for name, value in encoded.items()}


def _scatter_rows(rows: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """`rows` [N, ...] placed at `index` of a zero (False) tensor [total, ...]; differentiable."""
    return rows.new_zeros((total, *rows.shape[1:])).index_copy(0, index, rows)
