"""Zero-shot attribute questions answered from text prompts alone.

A binary attribute is decided by a softmax over a positive and a negative prompt ensemble
("... with eyeglasses" vs "... without eyeglasses"): asking "eyeglasses?" against nothing has
no calibrated threshold, while the pair gives a probability. A multi-class question
(expression, hair colour) takes the softmax over one prompt ensemble per class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flip.benchmarks.fairface import AGE_GROUPS, age_group_of
from flip.evaluation.binding import binding_metrics
from flip.evaluation.features import BenchmarkFeatures, SplitFeatures, extract_text_features
from flip.evaluation.metrics import attribute_scores, classification_scores, multiclass_metrics
from flip.evaluation.multitask import MultitaskPredictions, QuestionPredictions, ValuePredictions
from flip.evaluation.prompts import DEFAULT_TEMPLATES, resolve_binary, resolve_choices
from flip.evaluation.retrieval import flatten_captions, retrieval_recalls
from flip.evaluation.subgroups import subgroup_labels, subgroup_metrics
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
    features = model.encode_text(
        model.tokenize(prompts).to(device), normalize=True
    ).float()  # bf16 weights too
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


@torch.no_grad()
def expected_ages(
    model: FlipModel,
    image_features: torch.Tensor,
    templates: Sequence[str],
    min_age: int = 1,
    max_age: int = 100,
) -> np.ndarray:
    """Each image's expected age under the softmax over one prompt ensemble per age (every
    template filled with the number): a continuous estimate that a regression metric can
    score, where the argmax would snap to whichever number the text tower likes best."""
    if not 0 <= min_age < max_age:
        raise ValueError(f"age prompts need 0 <= min_age < max_age, got {min_age} and {max_age}")
    ages = torch.arange(min_age, max_age + 1, dtype=torch.float32)
    prompts = [prompt for age in ages.int().tolist() for prompt in expand(templates, [str(age)])]
    text = extract_text_features(model, prompts).view(len(ages), len(templates), -1)
    embeddings = F.normalize(text.mean(dim=1), dim=-1)  # the ensemble of each age, as ensemble_embedding
    logits = float(model.logit_scale.detach().exp()) * F.normalize(image_features, dim=-1) @ embeddings.T
    return (logits.softmax(dim=-1) @ ages).numpy().astype(np.float64)


def _multitask_predictions(
    model: FlipModel, features: SplitFeatures, prompts: Mapping[str, Any], templates: Sequence[str]
) -> tuple[MultitaskPredictions, list[str]]:
    """A multitask split's questions by class prompt ensembles, and its age (a value, or
    FairFace's buckets) by the expected age over age prompts; also the classes that fell back
    to built-in prompts."""
    split, image_features = features.split, features.features
    given, choices, fallback = prompts.get("multiclass") or {}, {}, []
    for question, (classes, _) in split.questions.items():
        choices[question], more = resolve_choices(classes, given.get(question))
        fallback += [f"{question}/{c}" for c in more]
    probs = ZeroShotClassifier.from_prompts(model, templates, None, choices).predict(image_features)
    predictions = MultitaskPredictions()
    for question, (classes, y) in split.questions.items():
        predictions.questions[question] = QuestionPredictions(
            classes, y, probs[question].argmax(dim=-1).numpy()
        )
    age = prompts.get("age")
    buckets = split.questions.get("age_group")
    bucketed = buckets is not None and list(buckets[0]) == AGE_GROUPS
    if age and ("age" in split.values or bucketed):
        ages = expected_ages(
            model,
            image_features,
            list(age["templates"]),
            int(age.get("min_age", 1)),
            int(age.get("max_age", 100)),
        )
        predictions.values["age"] = ValuePredictions(
            split.values.get("age"),
            ages,
            (list(AGE_GROUPS), buckets[1], age_group_of(ages)) if bucketed else None,
        )
    return predictions, fallback


# -- benchmark protocol ------------------------------------------------------------------------


def evaluate_zeroshot(
    model: FlipModel,
    features: SplitFeatures,
    prompts: Mapping[str, Any],
    checkpoint: str | None = None,
    subgroups: Sequence[str] = (),
) -> dict[str, Any]:
    """Zero-shot metrics of a split from its image features, in the metrics.json schema.

    `prompts` holds `templates` and, for attributes, `binary` (name -> {positive, negative})
    and `multiclass` (question -> {class: phrases}) or, for classification, `classes`
    (class -> phrases); a multitask split (UTKFace, FairFace) takes `multiclass` for its
    questions and `age` ({templates, min_age, max_age}) for the expected age. Labels without
    prompts get the built-in rule of flip.evaluation.prompts, and the report lists them.
    `subgroups` (multitask): the questions whose groups every metric is also reported for.
    """
    split = features.split
    templates = list(prompts.get("templates") or DEFAULT_TEMPLATES)
    image_features = features.features
    metrics: dict[str, Any] = {
        "benchmark": split.benchmark,
        "protocol": "zeroshot",
        "task": split.task,
        "checkpoint": checkpoint,
        "split": split.split,
        "n_train": 0,
        "n_test": len(split),
        "labels": list(split.label_names),
    }
    if split.task == "attributes":
        binary, fallback = resolve_binary(split.label_names, prompts.get("binary"))
        given = prompts.get("multiclass") or {}
        questions = {}
        for question, (classes, _) in split.questions.items():
            questions[question], more = resolve_choices(classes, given.get(question))
            fallback += [f"{question}/{c}" for c in more]
        classifier = ZeroShotClassifier.from_prompts(model, templates, binary, questions)
        probs = classifier.predict(image_features)
        summary, per_label = attribute_scores(split.targets, probs["binary"].numpy() > 0.5, split.label_names)
        multiclass = {}
        for question, (classes, y) in split.questions.items():
            keep = y >= 0
            pred = probs[question].argmax(dim=-1).numpy()
            m = multiclass_metrics(y[keep], pred[keep], classes)
            m["confusion_matrix"] = classification_scores(y[keep], pred[keep], classes)[2]
            multiclass[question] = m
            summary[f"{question}_accuracy"] = m["accuracy"]
            summary[f"{question}_mean_per_class_recall"] = m["mean_per_class_recall"]
        metrics.update(summary=summary, per_label=per_label)
        if multiclass:
            metrics["multiclass"] = multiclass
    elif split.task == "multitask":
        predictions, fallback = _multitask_predictions(model, features, prompts, templates)
        metrics.update(summary=predictions.scores(), per_label={}, multiclass=predictions.multiclass())
        if predictions.values:
            metrics["regression"] = predictions.regression()
        groups = subgroup_labels(split, subgroups)
        if groups:
            metrics["subgroups"] = subgroup_metrics(predictions, groups)
    else:
        choices, fallback = resolve_choices(split.label_names, prompts.get("classes"))
        classifier = ZeroShotClassifier.from_prompts(model, templates, None, {"class": choices})
        pred = classifier.predict(image_features)["class"].argmax(dim=-1).numpy()
        summary, per_label, confusion = classification_scores(split.targets, pred, split.label_names)
        metrics.update(summary=summary, per_label=per_label, confusion_matrix=confusion)
    if fallback:
        metrics["default_prompts_for"] = fallback
    if split.captions is not None:
        texts, text_image = flatten_captions(split.captions)
        text_features = extract_text_features(model, texts)
        metrics["retrieval"] = retrieval_recalls(image_features, text_features, text_image=text_image)
        # each caption against itself with one attribute changed (flip.evaluation.binding)
        metrics["binding"] = binding_metrics(model, split, image_features)
    return metrics


@dataclass
class ZeroShot:
    """The zero-shot protocol (conf/protocol/zeroshot.yaml): the evaluated split, asked with the
    benchmark's prompts. It has no settings of its own: the prompts belong to the benchmark."""

    def __call__(
        self, model: FlipModel, features: BenchmarkFeatures, checkpoint: str | None = None
    ) -> dict[str, Any]:
        benchmark = features.benchmark
        return evaluate_zeroshot(model, features(), benchmark.prompts, checkpoint, benchmark.subgroups)
