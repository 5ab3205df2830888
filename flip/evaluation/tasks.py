"""Fine-tuning tasks: what a head predicts from a split's labels, its loss, and how it scores.

A task is all that fine-tuning knows of a benchmark's labels. It reads the targets of a
`LabelledSplit`, sizes the head that conf/task/<name>.yaml names, gives the loss, and turns
predictions into the blocks of metrics.json the probes write (summary, per_label, confusion
matrix, regression), with the same metric functions (flip.evaluation.metrics). A dense task
(parsing, landmarks) is one more class here and one more conf/task file: its targets, a head
that reads block features (flip.models.heads), its loss and its metrics.

The training split fixes what a task does not know from its config (`bind`: attribute names,
classes, target statistics); those settings are saved with the fine-tuned model, so the head
is rebuilt without reading any split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flip.benchmarks.base import LabelledSplit
from flip.evaluation.metrics import attribute_scores, classification_scores, regression_metrics


@dataclass
class Task:
    """`head(in_features=..., out_features=...)` builds the head (a partial from the task's config)."""

    head: Callable[..., nn.Module]

    kind: ClassVar[str]  # metrics.json's "task"
    headline: ClassVar[str]  # the summary figure validation logs (`val/<headline>`)

    def bind(self, split: LabelledSplit) -> dict[str, Any]:
        """The settings `split` (the training split) fixes, as keyword arguments of this class."""
        raise NotImplementedError

    def check(self, split: LabelledSplit) -> None:
        """Fail, naming what differs, when `split` does not carry the labels this task was bound to."""
        raise NotImplementedError

    @property
    def outputs(self) -> int:
        raise NotImplementedError

    @property
    def labels(self) -> list[str]:
        """What metrics.json lists as `labels`."""
        raise NotImplementedError

    def targets(self, split: LabelledSplit) -> torch.Tensor:
        """One row of targets per sample of `split`, in its order."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        """metrics.json's blocks (summary, per_label, ...) of `outputs` against `targets`."""
        raise NotImplementedError

    def build_head(self, in_features: int) -> nn.Module:
        return self.head(in_features=in_features, out_features=self.outputs)


def _zero(outputs: torch.Tensor) -> torch.Tensor:
    """A loss of 0 that keeps the graph (a batch with no labelled entry)."""
    return outputs.sum() * 0.0


def _same(what: str, bound: Sequence[str], given: Sequence[str], split: LabelledSplit) -> None:
    if list(bound) != list(given):
        raise ValueError(
            f"{split.benchmark}/{split.split} has {what} {list(given)}, but the task was bound to "
            f"{list(bound)} by the training split; fine-tune and evaluate on splits of one benchmark"
        )


@dataclass
class Attributes(Task):
    """Binary attributes, one sigmoid each (multi-label): BCE over the labelled entries only."""

    names: list[str] | None = None

    kind: ClassVar[str] = "attributes"
    headline: ClassVar[str] = "mean_balanced_accuracy"

    def bind(self, split: LabelledSplit) -> dict[str, Any]:
        if split.task != "attributes":
            raise ValueError(
                f"task=attributes needs binary attributes, but {split.benchmark}/{split.split} holds "
                f"{split.task} labels; use task=classification (classes or one of its questions "
                f"{list(split.questions)}) or task=regression (values {list(split.values)})"
            )
        return {"names": list(split.label_names)}

    def check(self, split: LabelledSplit) -> None:
        _same("attributes", self.names or [], split.label_names if split.task == "attributes" else [], split)

    @property
    def outputs(self) -> int:
        return len(self.names or [])

    @property
    def labels(self) -> list[str]:
        return list(self.names or [])

    def targets(self, split: LabelledSplit) -> torch.Tensor:
        return torch.as_tensor(np.asarray(split.targets, dtype=np.float32))  # 1, 0, -1 unlabelled

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labelled = targets >= 0
        if not labelled.any():
            return _zero(outputs)
        return F.binary_cross_entropy_with_logits(outputs[labelled], targets[labelled])

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        truth = targets.cpu().numpy().astype(np.int8)
        summary, per_label = attribute_scores(truth, (outputs > 0).cpu().numpy(), self.labels)
        return {"summary": summary, "per_label": per_label}


@dataclass
class Classification(Task):
    """One softmax over classes: the split's own classes, or one of its multi-class `question`s
    (FaceShapes' expression, UTKFace's gender); cross-entropy over the labelled samples."""

    question: str | None = None
    classes: list[str] | None = None

    kind: ClassVar[str] = "classification"
    headline: ClassVar[str] = "accuracy"

    def _classes_of(self, split: LabelledSplit) -> list[str]:
        if self.question is None:
            if split.task != "classification":
                raise ValueError(
                    f"task=classification with task.question=null reads a split's classes, but "
                    f"{split.benchmark}/{split.split} holds {split.task} labels; name one of its "
                    f"multi-class questions {list(split.questions)} as task.question"
                )
            return list(split.label_names)
        if self.question not in split.questions:
            raise ValueError(
                f"task.question={self.question!r}: {split.benchmark}/{split.split} has the questions "
                f"{list(split.questions)}"
            )
        return list(split.questions[self.question][0])

    def bind(self, split: LabelledSplit) -> dict[str, Any]:
        return {"classes": self._classes_of(split)}

    def check(self, split: LabelledSplit) -> None:
        _same("classes", self.classes or [], self._classes_of(split), split)

    @property
    def outputs(self) -> int:
        return len(self.classes or [])

    @property
    def labels(self) -> list[str]:
        return list(self.classes or [])

    def targets(self, split: LabelledSplit) -> torch.Tensor:
        labels = split.targets if self.question is None else split.questions[self.question][1]
        return torch.as_tensor(np.asarray(labels, dtype=np.int64))  # -1 unlabelled

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labelled = targets >= 0
        if not labelled.any():
            return _zero(outputs)
        return F.cross_entropy(outputs[labelled], targets[labelled])

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        truth = targets.cpu().numpy()
        labelled = truth >= 0
        predicted = outputs.argmax(dim=1).cpu().numpy()
        summary, per_label, confusion = classification_scores(
            truth[labelled], predicted[labelled], self.labels
        )
        return {"summary": summary, "per_label": per_label, "confusion_matrix": confusion}


@dataclass
class Regression(Task):
    """One real value (UTKFace's age): L1 on the value standardised by the training split's mean
    and deviation, so the head starts near the answer whatever the value's scale."""

    value: str = "age"
    center: float | None = None
    scale: float | None = None

    kind: ClassVar[str] = "regression"

    @property
    def headline(self) -> str:  # type: ignore[override]
        return f"{self.value}_mae"

    def _values_of(self, split: LabelledSplit) -> np.ndarray:
        if self.value not in split.values:
            raise ValueError(
                f"task.value={self.value!r}: {split.benchmark}/{split.split} has the values "
                f"{list(split.values)}"
                + ("" if split.values else " (none: use task=attributes or classification)")
            )
        return np.asarray(split.values[self.value], dtype=np.float64)

    def bind(self, split: LabelledSplit) -> dict[str, Any]:
        values = self._values_of(split)
        values = values[np.isfinite(values)]
        if not len(values):
            raise ValueError(f"{split.benchmark}/{split.split}: no sample has a {self.value!r} value")
        deviation = float(values.std())
        return {"center": float(values.mean()), "scale": deviation if deviation > 0 else 1.0}

    def check(self, split: LabelledSplit) -> None:
        self._values_of(split)

    @property
    def outputs(self) -> int:
        return 1

    @property
    def labels(self) -> list[str]:
        return [self.value]

    def targets(self, split: LabelledSplit) -> torch.Tensor:
        return torch.as_tensor(self._values_of(split), dtype=torch.float32)  # NaN unlabelled

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """The value each output stands for, in the value's own units."""
        return outputs[:, 0].float() * float(self.scale or 1.0) + float(self.center or 0.0)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labelled = torch.isfinite(targets)
        if not labelled.any():
            return _zero(outputs)
        standard = (targets[labelled] - float(self.center or 0.0)) / float(self.scale or 1.0)
        return F.l1_loss(outputs[labelled, 0], standard)

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        truth, predicted = targets.cpu().double().numpy(), self.predictions(outputs).cpu().double().numpy()
        block = regression_metrics(truth, predicted)
        labelled = np.isfinite(truth)
        summary = {f"{self.value}_mae": block["mae"], f"{self.value}_cs5": block["cs5"]}
        block = {**block, "true": truth[labelled].tolist(), "predicted": predicted[labelled].tolist()}
        return {"summary": summary, "per_label": {}, "regression": {self.value: block}}
