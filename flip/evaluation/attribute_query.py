"""Zero-shot questions about faces, for people rather than benchmarks.

    model = flip.load(CKPT)
    flip.query(model, ["a.jpg", "b.jpg"], ["eyeglasses", "smiling", "blond hair"])  # [2, 3] probabilities
    flip.query(model, images, choices=["happy", "sad", "angry"])                       # [N, 3], rows sum to 1

An attribute is answered by the softmax over its positive and negative prompt ensembles
(flip.evaluation.prompts), a multi-class question by the softmax over one ensemble per
choice. The text side is encoded once per question, so asking many images costs one image
forward pass per batch.

Images come from users' folders, so any one of them may be unreadable: missing, not an image,
truncated, corrupt, or a decompression bomb. `ImageItems` reads each on its own and turns every
such failure into a reason attached to that image alone; `flip.query` and `flip-query` both
read through it, so one bad file never costs the answers for the others. The Python API raises
`UnreadableImage` naming the first bad image (`errors="raise"`, the default: a tensor has no
room for a reason), or gives its row NaN probabilities (`errors="nan"`) so that rows stay
aligned with the inputs; `flip-query` prints the reason on the image's own JSON line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import torch
from PIL import Image
from torch.utils.data import Dataset

from flip.evaluation.features import model_device
from flip.evaluation.prompts import DEFAULT_TEMPLATES, resolve_binary, resolve_choices
from flip.evaluation.zeroshot import ZeroShotClassifier, expand
from flip.models import FlipModel

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]  # noqa: UP007 (a runtime alias)


class UnreadableImage(ValueError):
    """One input image could not be read or preprocessed; `image` names it, `reason` says why."""

    def __init__(self, image: str, reason: str) -> None:
        super().__init__(f"image {image!r} could not be read: {reason}")
        self.image, self.reason = image, reason


def check_question(attributes: Sequence[str] | None, choices: Sequence[str] | None) -> list[str]:
    """The names asked about, or a ValueError saying what makes the question unanswerable.

    Checked before any model or image is loaded: a blank name would be answered about the
    templates alone ("a photo of a person with ."), and a multi-class question with one choice
    is a softmax over one class, 1.0 whatever the image.
    """
    if (attributes is None) == (choices is None):
        raise ValueError("ask either attributes (yes/no questions) or choices (one multi-class question)")
    kind = "attribute" if attributes is not None else "choice"
    given = attributes if attributes is not None else choices
    names = [given] if isinstance(given, str) else list(given)  # one name, not its letters
    blank = [i for i, name in enumerate(names) if not isinstance(name, str) or not name.strip()]
    if blank:
        raise ValueError(
            f"{kind} names must be non-blank text; got {[names[i] for i in blank]!r} at position(s) "
            f"{blank} of {names!r}"
        )
    if not names:
        raise ValueError(f"give at least one {kind} name")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{kind} names must be distinct; {duplicates} appear more than once in {names}")
    if choices is not None and len(names) < 2:
        raise ValueError(
            f"a multi-class question needs at least 2 choices, got {names}: the softmax over a single "
            "choice is 1.0 for every image. Add the alternatives, or ask a yes/no question with "
            f"attributes={names}"
        )
    return names


def context_length(model: FlipModel) -> int:
    """How many tokens the text tower reads; the tokenizer pads or cuts every prompt to it."""
    return int(model.tokenize("").shape[-1])


def check_prompts_fit(model: FlipModel, name: str, prompts: Sequence[str]) -> None:
    """Refuse a name whose prompts the tokenizer would cut to the context length.

    A cut prompt asks about its first words only, so the answer would be to another question
    without any sign of it. Tokenizing one token longer than the context shows whether anything
    was left over: that position is padding exactly when the whole prompt fits.
    """
    limit = context_length(model)
    if not prompts:
        return
    try:
        tokens = model.tokenizer(list(prompts), context_length=limit + 1)
    except TypeError:  # a tokenizer without the open_clip signature: nothing to compare against
        return
    cut = [
        prompt for prompt, row in zip(prompts, tokens, strict=True) if int(row[limit]) != model.pad_token_id
    ]
    if cut:
        shown = name if len(name) <= 60 else f"{name[:60]}... ({len(name)} characters)"
        example = cut[0] if len(cut[0]) <= 80 else f"{cut[0][:80]}..."
        raise ValueError(
            f"the name {shown!r}: its prompt {example!r} is longer than the text tower's context length "
            f"of {limit} tokens and would be cut to its first words; shorten the name or give shorter "
            "phrases for it (prompts=..., flip-query --prompts)"
        )


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
        names = check_question(attributes, choices)
        self.model, self.names, self.multiclass = model, names, choices is not None
        templates = list(templates or DEFAULT_TEMPLATES)
        if self.multiclass:
            phrases, _ = resolve_choices(names, prompts)
            for name in names:
                check_prompts_fit(model, name, expand(templates, phrases[name]))
            self.classifier = ZeroShotClassifier.from_prompts(model, templates, None, {"answer": phrases})
        else:
            pairs, _ = resolve_binary(names, prompts)
            for name in names:
                check_prompts_fit(
                    model, name, [p for side in pairs[name].values() for p in expand(templates, side)]
                )
            self.classifier = ZeroShotClassifier.from_prompts(model, templates, pairs)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[N, len(names)] probabilities for a batch of preprocessed images."""
        features = self.model.encode_image(images.to(model_device(self.model)), normalize=True).float().cpu()
        probs = self.classifier.predict(features)
        return probs["answer"] if self.multiclass else probs["binary"]

    def answer(
        self, batch: Sequence[tuple[int, torch.Tensor | None, str | None]]
    ) -> list[torch.Tensor | None]:
        """Probabilities per item of an `ImageItems` batch, in order; None where the image failed."""
        readable = [image for _, image, _ in batch if image is not None]
        probs = iter(self.probabilities(torch.stack(readable)) if readable else [])
        return [None if image is None else next(probs) for _, image, _ in batch]


def describe(image: ImageInput) -> str:
    """How an input is named in messages: its path, or what kind of object it is."""
    if isinstance(image, str | os.PathLike):
        return os.fspath(image)
    if isinstance(image, torch.Tensor):
        return f"tensor{tuple(image.shape)}"
    return type(image).__name__


def load_image(image: ImageInput, preprocess) -> torch.Tensor:
    """One preprocessed image [C, H, W]: a path, a PIL image, or an already preprocessed tensor.

    Every failure, whatever the decoder raises for a hostile file (PIL raises OSError,
    SyntaxError, ValueError, DecompressionBombError, ... ), is an `UnreadableImage` naming it.
    """
    try:
        if isinstance(image, torch.Tensor):
            if image.dim() != 3:
                raise ValueError(
                    f"an image tensor must be [C, H, W] (preprocessed), not {tuple(image.shape)}"
                )
            return image
        if isinstance(image, Image.Image):
            return preprocess(image.convert("RGB"))
        if not isinstance(image, str | os.PathLike):
            raise TypeError(
                f"an image is a path, a PIL image or a [C, H, W] tensor, not {type(image).__name__}"
            )
        if Path(image).is_dir():
            raise IsADirectoryError(f"{os.fspath(image)!r} is a folder, not an image file")
        with Image.open(Path(image)) as opened:
            return preprocess(opened.convert("RGB"))
    except Exception as exc:  # untrusted input: any failure is this image's alone
        raise UnreadableImage(describe(image), f"{type(exc).__name__}: {exc}") from exc


class ImageItems(Dataset):
    """The images of one query, read one by one: item i is (i, tensor, None) or (i, None, reason).

    The single place where images are read for questions, in loader workers (flip-query) or in
    the caller's process (flip.query): a failure is returned with its image, never raised.
    """

    def __init__(self, images: Sequence[ImageInput], preprocess) -> None:
        self.images, self.preprocess = list(images), preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, load_image(self.images[index], self.preprocess), None
        except UnreadableImage as err:
            return index, None, err.reason


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
    errors: Literal["raise", "nan"] = "raise",
) -> torch.Tensor:
    """Probabilities [N, A] of each attribute for each image, or [N, C] over `choices`.

    Images are paths, PIL images, or tensors (one [C, H, W] or a batch [N, C, H, W]) already
    transformed by `model.preprocess`. An image that cannot be read raises `UnreadableImage`
    naming it (`errors="raise"`), or gets a row of NaN (`errors="nan"`); the others are answered.
    """
    if errors not in ("raise", "nan"):
        raise ValueError(f"errors={errors!r}: choose 'raise' (stop at an unreadable image) or 'nan'")
    question = AttributeQuery(model, attributes, choices, prompts, templates)
    items = ImageItems(_as_list(images), model.preprocess)
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            batch = [items[i] for i in range(start, min(start + batch_size, len(items)))]
            for index, _, reason in batch:
                if reason is not None and errors == "raise":
                    raise UnreadableImage(describe(items.images[index]), reason)
            nan = torch.full((len(question.names),), math.nan)
            out += [nan if probs is None else probs for probs in question.answer(batch)]
    finally:
        model.train(was_training)
    return torch.stack(out) if out else torch.zeros(0, len(question.names))
