"""The token probe: FLIP's and FaRL's attribute head on a frozen image tower's block vectors.

Per chosen block the class token and the mean and max of the patch tokens
(flip.evaluation.token_features), each LayerNorm-ed, summed with learned weights, then one
linear layer; trained with AdamW and a per-epoch cosine schedule to 0, as FLIP's
celeba_recognition.py does. Two released heads:

- `flip` (FLIP's Celeba_Recognition): one LayerNorm shared by all vectors, raw learned weights
  (no softmax), Linear;
- `facer` (facer's VITClassificationHeadV0, the FaRL attribute head): a LayerNorm per vector,
  softmax-normalised weights, dropout, Linear.

The head and its training loop are flip.evaluation.token_head, the targets, losses and
scores by task flip.evaluation.probe_targets.

Selection: `honest` picks the epoch on the validation split (or a seeded hold-out of train,
not refit) and reports the test figure at that epoch; `test_as_published` adds the test
figure at the best epoch on the test set itself, what FLIP's and FaRL's code reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flip.evaluation.features import BenchmarkFeatures, SplitFeatures, model_device
from flip.evaluation.probe_targets import ProbeTargets, multitask_predictions, score_outputs
from flip.evaluation.subgroups import subgroup_labels, subgroup_metrics
from flip.evaluation.token_features import benchmark_token_vectors, tower_depth
from flip.evaluation.token_head import (
    HEADS,
    ProbeSettings,
    TokenHead,
    fit_token_probe,
    normalize_vectors_,
    predict,
    resolve_vector_dtype,
)
from flip.models import FlipModel
from flip.models.probe_tokens import resolve_probe_blocks

SELECTIONS = ("honest", "test_as_published")
AS_PUBLISHED = "selected on test, as published"


def _selection_score(scored: dict[str, Any], task: str, loss: float) -> float:
    """What picks the epoch: the papers' headline metric (mean accuracy over attributes, accuracy
    over classes); for multitask splits, whose metrics mix accuracies and errors, the loss."""
    if task == "attributes":
        value = scored["summary"]["mean_accuracy"]
    elif task == "classification":
        value = scored["summary"]["accuracy"]
    else:
        value = -loss
    return -math.inf if math.isnan(value) else float(value)


@dataclass
class _Tracker:
    """The best epoch of one scoring split and the head's parameters then (ties: the earlier epoch)."""

    x: torch.Tensor
    rows: torch.Tensor | None
    targets: ProbeTargets
    split: Any
    scores: list[float] = field(default_factory=list)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.rows is not None:
            self.split = self.split.subset(self.rows.cpu().numpy())

    def __call__(self, epoch: int, head: TokenHead) -> None:
        logits = predict(head, self.x, self.rows)
        loss_rows = slice(None) if self.rows is None else self.rows
        loss = float(self.targets.loss(logits, loss_rows)) if self.targets.task == "multitask" else 0.0
        score = _selection_score(score_outputs(logits, self.split, self.targets), self.targets.task, loss)
        self.scores.append(score)
        if self.best is None or score > self.best[0]:
            state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            self.best = (score, epoch, state)


@dataclass
class TokenProbe:
    """The token-probe protocol (conf/protocol/token_probe.yaml): a head trained on the vectors
    of `train_split` (a seeded subsample of `max_train`), its epoch chosen on `val_split`
    (`max_val`; or a seeded `holdout` part of train when it is None), tested on the evaluated
    split. `blocks`: 1-based block numbers and "final" (None: FLIP's choice at the tower's depth).
    """

    train_split: str
    val_split: str | None = None
    max_train: int | None = None
    max_val: int | None = None
    blocks: Sequence[int | str] | None = None
    head: str = "flip"
    dropout: float = 0.0
    selection: str = "honest"
    epochs: int = 100
    lr: float = 0.003
    batch_size: int = 128
    weight_decay: float = 0.05
    seed: int = 0
    holdout: float = 0.2
    compile: bool | str = "auto"
    vector_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        resolve_vector_dtype(self.vector_dtype)
        if self.head not in HEADS:
            raise ValueError(f"protocols.token_probe.head={self.head!r}: expected one of {HEADS}")
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"protocols.token_probe.selection={self.selection!r}: expected one of {SELECTIONS}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs={self.epochs} and batch_size={self.batch_size} must be at least 1")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout={self.holdout} must be in (0, 1)")

    @property
    def settings(self) -> ProbeSettings:
        return ProbeSettings(
            self.head,
            self.dropout,
            self.epochs,
            self.lr,
            self.batch_size,
            self.weight_decay,
            self.seed,
            self.compile,
        )

    def __call__(
        self, model: FlipModel, features: BenchmarkFeatures, checkpoint: str | None = None
    ) -> dict[str, Any]:
        depth = tower_depth(model)
        blocks = resolve_probe_blocks(self.blocks, depth) if depth else self.blocks
        train = benchmark_token_vectors(features, self.train_split, blocks, self.max_train, self.seed)
        val = (
            benchmark_token_vectors(features, self.val_split, blocks, self.max_val, self.seed)
            if self.val_split
            else None
        )
        test = benchmark_token_vectors(features, None, blocks)
        device = model_device(model)
        subgroups = features.benchmark.subgroups
        return self.metrics(train, test, val, checkpoint, device, blocks, subgroups)

    def metrics(
        self,
        train: SplitFeatures,
        test: SplitFeatures,
        val: SplitFeatures | None,
        checkpoint: str | None,
        device: torch.device | str = "cpu",
        blocks: Sequence[int | str] | None = None,
        subgroups: Sequence[str] = (),
    ) -> dict[str, Any]:
        """metrics.json of the probe; on a multitask split whose benchmark names `subgroups`, also
        every summary metric per demographic group (flip.evaluation.subgroups, as the other
        protocols). The vectors of the three splits are normalised in place."""
        for other in (s for s in (train, val) if s is not None):
            same = (
                other.split.task,
                other.split.label_names,
                list(other.split.questions),
                list(other.split.values),
            )
            if same != (
                test.split.task,
                test.split.label_names,
                list(test.split.questions),
                list(test.split.values),
            ):
                raise ValueError(
                    f"{other.split.split} and {test.split.split} disagree on their labels: "
                    f"{other.split.label_names or list(other.split.questions)} vs "
                    f"{test.split.label_names or list(test.split.questions)}"
                )
        groups = subgroup_labels(test.split, subgroups)
        device, dtype = torch.device(device), resolve_vector_dtype(self.vector_dtype)
        x_train = normalize_vectors_(train.features.to(device, torch.float32), dtype)
        x_test = normalize_vectors_(test.features.to(device, torch.float32), dtype)
        fit_rows: torch.Tensor | None = None
        if val is None:
            order = np.random.default_rng(self.seed + 1).permutation(len(train.split))
            held = max(1, round(self.holdout * len(order)))
            fit_rows = torch.as_tensor(np.sort(order[held:]), device=device)
            check_rows = torch.as_tensor(np.sort(order[:held]), device=device)
            train_targets = ProbeTargets.of(train.split, device, rows=fit_rows.cpu().numpy())
            chooser = _Tracker(x_train, check_rows, train_targets, train.split)
            selected_on = f"held-out {self.holdout:.0%} of {train.split.split} (not refit)"
        else:
            train_targets = ProbeTargets.of(train.split, device)
            x_val = normalize_vectors_(val.features.to(device, torch.float32), dtype)
            val_targets = ProbeTargets.of(val.split, device, train_targets.value_stats)
            chooser = _Tracker(x_val, None, val_targets, val.split)
            selected_on = val.split.split
        test_targets = ProbeTargets.of(test.split, device, train_targets.value_stats)
        on_test = (
            _Tracker(x_test, None, test_targets, test.split)
            if self.selection == "test_as_published"
            else None
        )

        def on_epoch(epoch: int, head: TokenHead) -> None:
            chooser(epoch, head)
            if on_test is not None:
                on_test(epoch, head)

        head = fit_token_probe(x_train, train_targets, self.settings, fit_rows, on_epoch)
        _, epoch, state = chooser.best
        head.load_state_dict(state)
        logits = predict(head, x_test)
        scored = score_outputs(logits, test.split, test_targets)
        metrics: dict[str, Any] = {
            "benchmark": test.split.benchmark,
            "protocol": "token_probe",
            "task": test.split.task,
            "checkpoint": checkpoint,
            "split": test.split.split,
            "n_train": len(train.split) if fit_rows is None else len(fit_rows),
            "n_test": len(test.split),
            "labels": list(test.split.label_names) or list(test.split.questions) + list(test.split.values),
            **scored,
            "selected": {"epoch": epoch, "on": selected_on, "scores": chooser.scores},
            "train_split": train.split.split,
            "val_split": None if val is None else val.split.split,
            "blocks": None if blocks is None else list(blocks),
            "vectors": int(x_train.shape[1]),
            "head": self.head,
            "settings": {
                "dropout": self.dropout,
                "epochs": self.epochs,
                "lr": self.lr,
                "batch_size": self.batch_size,
                "weight_decay": self.weight_decay,
                "seed": self.seed,
                "selection": self.selection,
                "vector_dtype": self.vector_dtype,
            },
        }
        if groups:
            predictions = multitask_predictions(logits, test.split, test_targets)
            metrics["subgroups"] = subgroup_metrics(predictions, groups)
        if on_test is not None:
            _, test_epoch, test_state = on_test.best
            head.load_state_dict(test_state)
            published = score_outputs(predict(head, x_test), test.split, test_targets)
            metrics["as_published"] = {
                "label": AS_PUBLISHED,
                "summary": published["summary"],
                "selected": {"epoch": test_epoch, "scores": on_test.scores},
            }
        return metrics
