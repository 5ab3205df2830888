"""What a token probe predicts for each task, its loss, and how its outputs are scored.

Loss by task: BCE-with-logits for attributes (-1 = unlabelled, masked out), cross-entropy for
classes, and for multitask splits cross-entropy per question plus L1 per regression value (on
the value standardised with the training rows' mean and std, reported back in its own units:
MAE and CS@5, the fraction within 5, by flip.evaluation.multitask as for the other protocols).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flip.evaluation.metrics import attribute_scores, classification_scores
from flip.evaluation.multitask import MultitaskPredictions, QuestionPredictions, ValuePredictions


@dataclass
class ProbeTargets:
    """A split's labels as tensors, and what the head's outputs mean for them.

    Multitask: the outputs are each question's class logits in order, then one output per
    regression value (standardised by `value_stats`, the training rows' mean and std).
    """

    task: str
    outputs: int
    y: torch.Tensor  # attributes [N, A] 0/1 float; classes [N]; multitask questions [N, Q] (-1 unlabelled)
    mask: torch.Tensor | None = None  # attributes: labelled entries
    values: torch.Tensor | None = None  # multitask: standardised values [N, R] (0 where unlabelled)
    value_mask: torch.Tensor | None = None
    slices: list[tuple[str, slice]] = field(default_factory=list)  # multitask question -> outputs
    value_names: list[str] = field(default_factory=list)
    value_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(
        cls,
        split: Any,
        device: torch.device | str = "cpu",
        value_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
        rows: np.ndarray | None = None,
    ) -> ProbeTargets:
        """Targets of a LabelledSplit; regression stats from `value_stats`, else from `rows` (all)."""
        if split.task == "attributes":
            y = torch.as_tensor(split.targets, dtype=torch.int8)
            return cls("attributes", y.shape[1], y.clamp(min=0).float().to(device), mask=(y >= 0).to(device))
        if split.task == "classification":
            y = torch.as_tensor(split.targets, dtype=torch.int64).to(device)
            return cls("classification", len(split.label_names), y)
        if split.task != "multitask":
            raise ValueError(
                f"{split.benchmark}/{split.split}: the token probe trains on attributes, classes or "
                f"multitask labels, not {split.task!r}"
            )
        slices, start, columns = [], 0, []
        for question, (classes, labels) in split.questions.items():
            slices.append((question, slice(start, start + len(classes))))
            start += len(classes)
            columns.append(torch.as_tensor(labels, dtype=torch.int64))
        n = len(split)
        y = torch.stack(columns, dim=1) if columns else torch.zeros(n, 0, dtype=torch.int64)
        names = list(split.values)
        raw = torch.as_tensor(
            np.stack([split.values[v] for v in names], axis=1) if names else np.zeros((n, 0))
        )
        raw = raw.to(torch.float32)
        labelled = torch.isfinite(raw)
        if value_stats is None:
            fit = raw if rows is None else raw[torch.as_tensor(rows)]
            ok = torch.isfinite(fit)
            count = ok.sum(dim=0).clamp(min=1)
            mean = torch.where(ok, fit, 0).sum(dim=0) / count
            var = torch.where(ok, (fit - mean) ** 2, 0).sum(dim=0) / count
            value_stats = (mean, var.sqrt().clamp(min=1e-6))
        mean, std = value_stats
        values = torch.where(labelled, (raw - mean) / std, 0)
        return cls(
            "multitask",
            start + len(names),
            y.to(device),
            values=values.to(device),
            value_mask=labelled.to(device),
            slices=slices,
            value_names=names,
            value_stats=(mean, std),
        )

    def loss(self, logits: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        """The mean loss of a batch of rows (labelled entries only)."""
        if self.task == "attributes":
            mask = self.mask[rows]
            bce = F.binary_cross_entropy_with_logits(logits, self.y[rows], reduction="none")
            return (bce * mask).sum() / mask.sum().clamp(min=1)
        if self.task == "classification":
            return F.cross_entropy(logits, self.y[rows])
        y = self.y[rows]
        total = logits.new_zeros(())
        for q, (_, outputs) in enumerate(self.slices):
            labels = y[:, q]
            ce = F.cross_entropy(logits[:, outputs], labels, ignore_index=-1, reduction="sum")
            total = total + ce / (labels >= 0).sum().clamp(min=1)
        if self.value_names:
            mask = self.value_mask[rows]
            l1 = (logits[:, -len(self.value_names) :] - self.values[rows]).abs() * mask
            total = total + (l1.sum(dim=0) / mask.sum(dim=0).clamp(min=1)).sum()
        return total

    def loss_gradient(
        self, logits: torch.Tensor, rows: torch.Tensor, with_loss: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`loss` (None unless `with_loss`: attributes then skip the BCE itself) and its gradient
        wrt the logits, written out (the training step's autograd-free path)."""
        if self.task == "attributes":
            mask = self.mask[rows].to(logits.dtype)
            count = mask.sum().clamp(min=1)
            y = self.y[rows]
            grad = (torch.sigmoid(logits) - y) * mask / count
            if not with_loss:
                return None, grad
            bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
            return (bce * mask).sum() / count, grad
        if self.task == "classification":
            y = self.y[rows]
            log_p = torch.log_softmax(logits, dim=1)
            value = -log_p.gather(1, y[:, None]).mean()
            return value, (log_p.exp() - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / len(y)
        y = self.y[rows]
        value = logits.new_zeros(())
        grad = torch.zeros_like(logits)
        for q, (_, outputs) in enumerate(self.slices):
            labels = y[:, q]
            valid = (labels >= 0).to(logits.dtype)
            count = valid.sum().clamp(min=1)
            log_p = torch.log_softmax(logits[:, outputs], dim=1)
            safe = labels.clamp(min=0)
            value = value - (log_p.gather(1, safe[:, None]).squeeze(1) * valid).sum() / count
            onehot = F.one_hot(safe, log_p.shape[1]).to(logits.dtype)
            grad[:, outputs] = (log_p.exp() - onehot) * valid[:, None] / count
        if self.value_names:
            r = len(self.value_names)
            mask = self.value_mask[rows].to(logits.dtype)
            count = mask.sum(dim=0).clamp(min=1)
            diff = logits[:, -r:] - self.values[rows]
            value = value + ((diff.abs() * mask).sum(dim=0) / count).sum()
            grad[:, -r:] = torch.sign(diff) * mask / count
        return value, grad


def score_outputs(logits: torch.Tensor, split: Any, targets: ProbeTargets) -> dict[str, Any]:
    """summary + per_label (+ confusion matrix, or multiclass and regression blocks) of the head's
    outputs on a split, in the metrics.json schema of the other probes."""
    logits = logits.float().cpu()
    names = list(split.label_names)
    if targets.task == "attributes":
        summary, per_label = attribute_scores(split.targets, (logits > 0).numpy(), names)
        return {"summary": summary, "per_label": per_label}
    if targets.task == "classification":
        summary, per_label, confusion = classification_scores(split.targets, logits.argmax(1).numpy(), names)
        return {"summary": summary, "per_label": per_label, "confusion_matrix": confusion}
    predictions = multitask_predictions(logits, split, targets)
    out: dict[str, Any] = {"summary": predictions.scores(), "per_label": {}}
    if predictions.questions:
        out["multiclass"] = predictions.multiclass()
    if predictions.values:
        out["regression"] = predictions.regression()
    return out


def multitask_predictions(logits: torch.Tensor, split: Any, targets: ProbeTargets) -> MultitaskPredictions:
    """The head's outputs on a multitask split as the other protocols' predictions (a class per
    question, each value back in its own units), so that its summary, details and per-subgroup
    figures are computed by the same code as the linear probe's and zero-shot's."""
    logits = logits.float().cpu()
    predictions = MultitaskPredictions()
    for question, outputs in targets.slices:
        classes, y = split.questions[question]
        predictions.questions[question] = QuestionPredictions(
            list(classes), np.asarray(y), logits[:, outputs].argmax(dim=1).numpy()
        )
    if targets.value_names:
        mean, std = targets.value_stats
        predicted = (logits[:, -len(targets.value_names) :] * std + mean).double().numpy()
        for r, name in enumerate(targets.value_names):
            predictions.values[name] = ValuePredictions(
                np.asarray(split.values[name], dtype=float), predicted[:, r]
            )
    return predictions
