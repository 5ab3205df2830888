"""Zero-shot attribute questions answered from text prompts alone.

A binary attribute is decided by a softmax over a positive and a negative prompt ensemble
("... with eyeglasses" vs "... without eyeglasses"): asking "eyeglasses?" against nothing has
no calibrated threshold, while the pair gives a probability. A multi-class question
(expression, hair colour) takes the softmax over one prompt ensemble per class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flip.models import FlipModel


def expand(templates: Sequence[str], phrases: Sequence[str]) -> list[str]:
    """Every template filled with every phrase: the prompt ensemble."""
    if not templates or not phrases:
        raise ValueError(f"a prompt ensemble needs templates and phrases, got {templates!r} and {phrases!r}")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"prompt templates need a '{{}}' placeholder for the phrase, got {bad!r}")
    return [template.format(phrase) for template in templates for phrase in phrases]


@torch.no_grad()
def ensemble_embedding(model: FlipModel, prompts: Sequence[str]) -> torch.Tensor:
    """Mean of the normalised prompt embeddings, renormalised (CLIP's prompt ensembling)."""
    device = next(model.parameters()).device
    features = model.encode_text(model.tokenize(prompts).to(device), normalize=True)
    return F.normalize(features.mean(dim=0), dim=-1)


@dataclass
class ZeroShotClassifier:
    """Class embeddings per question; `predict` turns image features into probabilities."""

    binary_names: list[str]
    binary_embeddings: torch.Tensor | None  # [A, 2, D]: positive then negative
    multiclass: dict[str, tuple[list[str], torch.Tensor]]  # question -> (classes, [C, D])
    logit_scale: float

    @classmethod
    def from_prompts(
        cls,
        model: FlipModel,
        templates: Sequence[str],
        binary: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        multiclass: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    ) -> ZeroShotClassifier:
        """Binary: name -> {positive: [...], negative: [...]}; multiclass: name -> {class: [...]}.

        Phrases fill the `templates`; each side or class is the ensemble of all fillings.
        """
        binary, multiclass = binary or {}, multiclass or {}
        pairs = []
        for name, sides in binary.items():
            if set(sides) != {"positive", "negative"}:
                raise ValueError(
                    f"binary prompts for {name!r} need exactly 'positive' and 'negative', got {list(sides)}"
                )
            pairs.append(
                torch.stack(
                    [ensemble_embedding(model, expand(templates, sides[s])) for s in ("positive", "negative")]
                )
            )
        questions = {
            name: (
                list(classes),
                torch.stack([ensemble_embedding(model, expand(templates, p)) for p in classes.values()]),
            )
            for name, classes in multiclass.items()
        }
        return cls(
            binary_names=list(binary),
            binary_embeddings=torch.stack(pairs) if pairs else None,
            multiclass=questions,
            logit_scale=float(model.logit_scale.detach().exp()),
        )

    @torch.no_grad()
    def predict(self, image_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities: `binary` [N, A] of the positive side; one [N, C] per multi-class question."""
        image_features = F.normalize(image_features, dim=-1)
        out = {}
        if self.binary_names:
            logits = self.logit_scale * torch.einsum("nd,acd->nac", image_features, self.binary_embeddings)
            out["binary"] = logits.softmax(dim=-1)[..., 0]
        for name, (_, embeddings) in self.multiclass.items():
            out[name] = (self.logit_scale * image_features @ embeddings.T).softmax(dim=-1)
        return out
