"""The binding metric: does an image's own caption outscore the same caption with one attribute changed?

Zero-shot accuracy asks "with a mustache" against "without a mustache" in the prompts'
words; binding asks it inside the image's real caption, with everything else the caption
says left in place, which is what a bag-of-words text tower gets wrong and what attribute
hard negatives (`data.hard_negatives`) train. For each test image with a caption, one foil
per attribute the caption states (`flip.data.foils`: the caption grammar when the split's
labels are those of FaceShapes or CelebA, the phrase table otherwise; the new value and its
wording drawn from a generator seeded by the image's key) is scored against the image like
the caption is; the foil is beaten when the true caption's cosine similarity is higher.
Reported per changed attribute and over all foils.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flip.benchmarks.base import LabelledSplit
from flip.data.foils import Candidate, FoilMaker, stable_seed
from flip.evaluation.features import extract_text_features
from flip.models import FlipModel

__all__ = ["binding_metrics", "split_record"]


def split_record(split: LabelledSplit, index: int) -> dict[str, Any]:
    """Image `index`'s labels as an attribute record: binary ones as booleans, questions by class
    name (None where unlabelled), the form caption grammars read."""
    record: dict[str, Any] = {}
    if split.task == "attributes":
        for name, value in zip(split.label_names, split.targets[index], strict=True):
            record[name] = None if value < 0 else bool(value)
    for question, (classes, y) in split.questions.items():
        record[question] = classes[int(y[index])] if y[index] >= 0 else None
    return record


def _one_per_attribute(candidates: list[Candidate], rng: random.Random) -> list[Candidate]:
    by_attribute: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_attribute.setdefault(candidate.attribute, []).append(candidate)
    return [rng.choice(by_attribute[name]) for name in sorted(by_attribute)]


@torch.no_grad()
def binding_metrics(
    model: FlipModel,
    split: LabelledSplit,
    image_features: torch.Tensor,
    maker: FoilMaker | None = None,
) -> dict[str, Any] | None:
    """Foil accuracy of a captioned split, overall and per changed attribute; None without captions.

    With several captions per image the first is foiled.
    """
    if split.captions is None:
        return None
    maker = maker or FoilMaker(source="auto")
    captions, foils, owners = [], [], []
    for index, caption in enumerate(split.captions):
        text = caption if isinstance(caption, str) else (caption[0] if caption else "")
        captions.append(text)
        rng = random.Random(stable_seed("binding", split.keys[index], text))
        for foil in _one_per_attribute(maker.candidates(text, split_record(split, index)), rng):
            foils.append(foil)
            owners.append(index)
    result: dict[str, Any] = {"n_images": len(set(owners)), "n_foils": len(foils), "per_attribute": {}}
    if not foils:
        return {**result, "accuracy": None, "mean_per_attribute": None}
    images = F.normalize(image_features.float(), dim=-1)
    owner = torch.tensor(owners)
    true = extract_text_features(model, [captions[i] for i in sorted(set(owners))])
    row = {i: r for r, i in enumerate(sorted(set(owners)))}
    true_scores = (images[owner] * true[torch.tensor([row[i] for i in owners])]).sum(-1)
    foil_scores = (images[owner] * extract_text_features(model, [f.text for f in foils])).sum(-1)
    beaten = (true_scores > foil_scores).numpy()
    attributes = np.array([f.attribute for f in foils])
    for name in sorted(set(attributes)):
        hits = beaten[attributes == name]
        result["per_attribute"][name] = {"accuracy": float(hits.mean()), "n": int(hits.size)}
    accuracies = [m["accuracy"] for m in result["per_attribute"].values()]
    return {**result, "accuracy": float(beaten.mean()), "mean_per_attribute": float(np.mean(accuracies))}
