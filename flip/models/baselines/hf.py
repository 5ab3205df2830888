"""Hugging Face `CLIPModel` and `SiglipModel` folders (or hub ids), used as `transformers` runs them.

The model stays the `transformers` model: `encode_image`/`encode_text` are its
`get_image_features`/`get_text_features`, `preprocess` is its image processor and `tokenize` its
tokenizer, so the embeddings are the ones its model card promises, resize and normalisation
included. Texts are padded to the text tower's length (`padding="max_length"`, as SigLIP was
trained and as its card asks); no attention mask is passed, as SigLIP expects, and CLIP's causal
text tower pools its end-of-text token, which only attends to the tokens before it, so padding
never reaches it. Such a model has no open_clip towers: it evaluates, but token features
(FILIP) are not for it; flip-convert rewrites a CLIPModel as open_clip's CLIP
(flip.models.baselines.hf_to_open_clip), with open_clip's tokenizer and transform.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from flip.models.baselines.weights import SHOWN, WeightsError
from flip.models.flip_model import FlipModel

log = logging.getLogger(__name__)

MODEL_TYPES = ("clip", "siglip")


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns an output whose pooler_output is the projected embedding; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFTowers(nn.Module):
    """The two towers and temperature of a `CLIPModel`/`SiglipModel`, in open_clip's calling style."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return getattr(self.model, "logit_bias", None)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = _features(self.model.get_image_features(pixel_values=images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = _features(self.model.get_text_features(input_ids=text))
        return F.normalize(features, dim=-1) if normalize else features


class HFTokenizer:
    """Texts -> input ids [N, context_length], as the model's tokenizer pads and cuts them."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=context_length or self.context_length,
            return_tensors="pt",
        )
        return encoded["input_ids"]


class HFImageTransform:
    """PIL image -> the pixel tensor [3, H, W] the model's image processor makes of it."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImageTransform({type(self.processor).__name__})"


class HFFlipModel(FlipModel):
    """A `transformers` CLIP/SigLIP model behind FlipModel's interface (pooled features only)."""

    def forward(self, images: torch.Tensor, text: torch.Tensor, return_tokens: bool = False):
        if return_tokens:
            raise ValueError(
                f"{self.config['name']!r} is a Hugging Face {self.config['model_type']} model: it gives "
                "pooled features only, not the token features a FILIP loss needs"
            )
        return super().forward(images, text)


def _check_loading(source: str, loading: dict[str, Any]) -> None:
    """transformers fills weights a folder lacks with random ones and only warns; a baseline with
    random weights would be scored as if it were the published model, so that is refused."""
    missing = sorted(loading.get("missing_keys") or [])
    mismatched = sorted(
        str(k[0]) if isinstance(k, tuple) else str(k) for k in loading.get("mismatched_keys") or []
    )
    if missing or mismatched:
        problems = []
        if missing:
            more = ", ..." if len(missing) > SHOWN else ""
            problems.append(f"{len(missing)} missing ({', '.join(missing[:SHOWN])}{more})")
        if mismatched:
            problems.append(f"{len(mismatched)} of another shape ({', '.join(mismatched[:SHOWN])})")
        raise WeightsError(
            f"baseline.path={source!r}: its weights do not fill the model its config.json describes: "
            f"{'; '.join(problems)}. A truncated download or a folder of another model; give a complete "
            "CLIPModel/SiglipModel folder (config.json, model.safetensors or pytorch_model.bin, "
            "processor files)"
        )
    unexpected = sorted(loading.get("unexpected_keys") or [])
    if unexpected:  # extra tensors (older files' position_ids buffers) leave the model complete
        log.warning(
            "%s: %d tensor(s) the model does not use were ignored: %s",
            source,
            len(unexpected),
            unexpected[:SHOWN],
        )


def load_hf(path: str | os.PathLike) -> HFFlipModel:
    """A `CLIPModel`/`SiglipModel` folder (config.json + weights + processor files) or hub id."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    source = str(path)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:  # not a folder with config.json, and the hub is unreachable or has no such id
        raise FileNotFoundError(
            f"baseline.path={source!r} is neither a folder with a Hugging Face config.json nor a hub id "
            f"that could be fetched ({str(err).splitlines()[0]})"
        ) from None
    if config.model_type not in MODEL_TYPES:
        raise ValueError(
            f"{source!r} is a Hugging Face {config.model_type!r} model; baseline.format=hf loads "
            f"{', '.join(MODEL_TYPES)} models (CLIPModel, SiglipModel)"
        )
    # float32 whatever the file's dtype: features are compared and cached in float32
    model, loading = AutoModel.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    _check_loading(source, loading)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    processor = AutoImageProcessor.from_pretrained(source)
    context_length = int(config.text_config.max_position_embeddings)
    transform = HFImageTransform(processor)
    return HFFlipModel(
        HFTowers(model),
        HFTokenizer(tokenizer, context_length),
        transform,
        transform,
        {"name": f"hf:{source}", "model_type": config.model_type, "format": "hf"},
    )
