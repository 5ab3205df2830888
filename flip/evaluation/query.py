"""Zero-shot questions about faces, for people rather than benchmarks.

    model = flip.load(CKPT)
    model.query(["a.jpg", "b.jpg"], ["eyeglasses", "smiling", "blond hair"])  # [2, 3] probabilities
    model.query(images, choices=["happy", "sad", "angry"])                       # [N, 3], rows sum to 1

An attribute is answered by the softmax over its positive and negative prompt ensembles
(flip.evaluation.prompts), a multi-class question by the softmax over one ensemble per
choice. The text side is encoded once per question, so asking many images costs one image
forward pass per batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image

from flip.evaluation.features import model_device
from flip.evaluation.prompts import DEFAULT_TEMPLATES, resolve_binary, resolve_choices
from flip.evaluation.zeroshot import ZeroShotClassifier
from flip.models import FlipModel

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]  # noqa: UP007 (a runtime alias)


class AttributeQuery:
    """A question compiled once (text embeddings), then asked of any number of image batches."""

    def __init__(
        self,
        model: FlipModel,
        attributes: Sequence[str] | None = None,
        choices: Sequence[str] | None = None,
        prompts: Mapping[str, Any] | None = None,
        templates: Sequence[str] | None = None,
    ) -> None:
        """`prompts` overrides phrases per name: attribute -> {positive, negative}, choice -> [phrases]."""
        if (attributes is None) == (choices is None):
            raise ValueError("ask either attributes (yes/no questions) or choices (one multi-class question)")
        names = list(attributes if attributes is not None else choices)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"give distinct, non-empty attribute or choice names, got {names}")
        self.model, self.names, self.multiclass = model, names, choices is not None
        templates = list(templates or DEFAULT_TEMPLATES)
        if self.multiclass:
            phrases, _ = resolve_choices(names, prompts)
            self.classifier = ZeroShotClassifier.from_prompts(model, templates, None, {"answer": phrases})
        else:
            pairs, _ = resolve_binary(names, prompts)
            self.classifier = ZeroShotClassifier.from_prompts(model, templates, pairs)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[N, len(names)] probabilities for a batch of preprocessed images."""
        features = self.model.encode_image(images.to(model_device(self.model)), normalize=True).float().cpu()
        probs = self.classifier.predict(features)
        return probs["answer"] if self.multiclass else probs["binary"]


def load_image(image: ImageInput, preprocess) -> torch.Tensor:
    """One preprocessed image [C, H, W]: a path, a PIL image, or an already preprocessed tensor."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise ValueError(f"an image tensor must be [C, H, W] (preprocessed), not {tuple(image.shape)}")
        return image
    if isinstance(image, Image.Image):
        return preprocess(image.convert("RGB"))
    with Image.open(Path(image)) as opened:
        return preprocess(opened.convert("RGB"))


def _as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    if isinstance(images, torch.Tensor):
        return list(images) if images.dim() == 4 else [images]
    if isinstance(images, str | os.PathLike | Image.Image):
        return [images]
    return list(images)


def query(
    model: FlipModel,
    images: ImageInput | Iterable[ImageInput],
    attributes: Sequence[str] | None = None,
    choices: Sequence[str] | None = None,
    prompts: Mapping[str, Any] | None = None,
    templates: Sequence[str] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Probabilities [N, A] of each attribute for each image, or [N, C] over `choices`.

    Images are paths, PIL images, or tensors (one [C, H, W] or a batch [N, C, H, W]) already
    transformed by `model.preprocess`.
    """
    question = AttributeQuery(model, attributes, choices, prompts, templates)
    items = _as_list(images)
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            batch = torch.stack([load_image(i, model.preprocess) for i in items[start : start + batch_size]])
            out.append(question.probabilities(batch))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(question.names))
