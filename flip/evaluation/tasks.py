"""Fine-tuning tasks: what a head predicts from a split's labels, its loss, and how it scores.

A task is all that fine-tuning knows of a benchmark's labels. It reads the targets of a
`LabelledSplit`, sizes the head that conf/task/<name>.yaml names, gives the loss, and turns
predictions into the blocks of metrics.json the probes write (summary, per_label, confusion
matrix, regression), with the same metric functions (flip.evaluation.metrics). The dense
tasks (parsing, landmarks) are two more classes: each face's square crop as input
(flip.evaluation.dense_features), a head that reads block features (flip.models.dense_heads),
and the dense probes' metrics (flip.evaluation.dense_metrics), examples for their figure
included.

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

from flip.benchmarks.base import ImageSource, LabelledSplit
from flip.benchmarks.dense import IGNORE
from flip.evaluation.dense_features import DenseCrops, crop_points, label_maps
from flip.evaluation.dense_metrics import confusion_matrix, landmark_scores, parsing_scores
from flip.evaluation.metrics import attribute_scores, classification_scores, regression_metrics
from flip.models.dense_heads import HeatmapPoints, upsample
from flip.models.heads import embedding_width


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
    def labels(self) -> list[str]:
        """What metrics.json lists as `labels`: one per output of the head."""
        raise NotImplementedError

    @property
    def outputs(self) -> int:
        return len(self.labels)

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

    # What a dense task changes; the defaults are the pooled tasks'.
    augments: ClassVar[bool] = True  # False: the training transform's random crops would move the labels

    def settle(self, model: nn.Module) -> dict[str, Any]:
        """The settings the model fixes (a dense task's label size), as keyword arguments."""
        return {}

    def head_for(self, model: nn.Module) -> nn.Module:
        """The head on `model`'s image tower (a pooled task's reads its embedding)."""
        return self.build_head(embedding_width(model))

    def images(self, split: LabelledSplit) -> ImageSource:
        """What the tower sees of each sample: the split's images (a dense task: each face's crop)."""
        return split.images

    def kept(self, outputs: torch.Tensor) -> torch.Tensor:
        """What `scores` reads of a batch's outputs (a parsing task: class maps, not logits)."""
        return outputs

    kept_dtype: ClassVar[torch.dtype] = torch.float32

    def split_scores(self, kept: torch.Tensor, split: LabelledSplit, examples: int = 0) -> dict[str, Any]:
        """metrics.json's blocks of the kept outputs of every sample of `split` (the evaluation's;
        a dense task adds what its report draws, for `examples` faces)."""
        return self.scores(kept, self.targets(split))


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


def _dense_kind(split: LabelledSplit, kind: str) -> None:
    if split.task != kind:
        raise ValueError(
            f"task={kind} needs a {kind} benchmark (lapa, celebamask_hq, wflw, 300w, aflw19, "
            f"faceshapes_{kind if kind == 'parsing' else 'landmarks'}, ...); {split.benchmark}/{split.split} "
            f"holds {split.task} labels"
        )


def _crops(split: LabelledSplit, count: int, size: int) -> list[np.ndarray]:
    crops = DenseCrops(split.images, split.dense)
    return [np.asarray(crops.load(i).convert("RGB").resize((size, size))) for i in range(count)]


@dataclass
class _Dense(Task):
    """Settings of both dense tasks; the head reads `head.blocks` of the tower at its token width."""

    augments: ClassVar[bool] = False

    def head_for(self, model: nn.Module) -> nn.Module:
        transformer = getattr(model.clip.visual, "transformer", None)
        if transformer is None or not hasattr(model.clip.visual, "forward_intermediates"):
            raise ValueError(
                f"task={self.kind} reads a ViT's patch tokens (open_clip's VisionTransformer), not "
                f"{type(model.clip.visual).__name__}'s"
            )
        head = self.build_head(int(transformer.width))
        depth = len(transformer.resblocks)
        if max(head.blocks) > depth:
            raise ValueError(
                f"task.head.blocks={list(head.blocks)}: the image tower has blocks 1..{depth}; "
                f"e.g. {sorted({max(1, depth // 3), max(1, 2 * depth // 3), depth})}"
            )
        return head

    def images(self, split: LabelledSplit) -> ImageSource:
        return DenseCrops(split.images, split.dense)


@dataclass
class Parsing(_Dense):
    """Face parsing: the head's logits upsampled bilinearly to `label_size` (the tower's input size
    unless set), cross-entropy against each crop's mask there (padding ignored); scored as the
    parsing probe scores, FaRL's F1 and mIoU over one confusion matrix of all test pixels, here
    at `label_size` on each face's crop."""

    label_size: int | None = None
    classes: list[str] | None = None

    kind: ClassVar[str] = "parsing"
    headline: ClassVar[str] = "mean_f1"
    kept_dtype: ClassVar[torch.dtype] = torch.uint8

    def bind(self, split: LabelledSplit) -> dict[str, Any]:
        _dense_kind(split, "parsing")
        return {"classes": list(split.label_names)}

    def check(self, split: LabelledSplit) -> None:
        _dense_kind(split, "parsing")
        _same("classes", self.classes or [], split.label_names, split)

    def settle(self, model: nn.Module) -> dict[str, Any]:
        return {"label_size": int(self.label_size or model.clip.visual.image_size[0])}

    @property
    def size(self) -> int:
        if not self.label_size:
            raise ValueError("task.label_size is unset: call settle(model) first, or set it")
        return int(self.label_size)

    @property
    def labels(self) -> list[str]:
        return list(self.classes or [])

    def build_head(self, in_features: int) -> nn.Module:
        return self.head(width=in_features, out_channels=self.outputs)

    def targets(self, split: LabelledSplit) -> torch.Tensor:
        return torch.from_numpy(label_maps(split, self.size))  # [N, S, S] uint8, IGNORE off the image

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(upsample(outputs, self.size), targets.long(), ignore_index=IGNORE)

    def kept(self, outputs: torch.Tensor) -> torch.Tensor:
        return upsample(outputs.float(), self.size).argmax(dim=1).to(torch.uint8)

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        confusion = confusion_matrix(targets.cpu().numpy(), outputs.cpu().numpy(), self.outputs)
        return {
            **parsing_scores(confusion, self.labels),
            "confusion_matrix": confusion.tolist(),
            "label_size": self.size,
            "scored_at": f"{self.size} px label maps of each face's crop",
        }

    def split_scores(self, kept: torch.Tensor, split: LabelledSplit, examples: int = 0) -> dict[str, Any]:
        truth = self.targets(split)
        shown = min(examples, len(split))
        return {
            **self.scores(kept, truth),
            "_examples": {
                "images": _crops(split, shown, self.size),
                "true": list(truth[:shown].numpy()),
                "predicted": list(kept[:shown].cpu().numpy().astype(np.uint8)),
                "classes": self.labels,
            },
        }


@dataclass
class Landmarks(_Dense):
    """Facial landmarks: per-point heatmaps from the head (upsampled `upscale` times), read by
    soft-argmax, L1 on the points as fractions of each face's crop; scored as the landmark probe
    scores, NME with the benchmark's normaliser, failure rate and AUC at `thresholds`.

    A sample's targets are [K + 1, 2]: its K points as fractions of the crop, then its normaliser
    over the crop's side (twice). NME is scale-free, so the error over that is the NME in image
    pixels (points_from_crop is a scaling and a shift), and validation scores without the split.
    """

    thresholds: list[float] | None = None
    upscale: int = 4
    points: list[str] | None = None

    kind: ClassVar[str] = "landmarks"
    headline: ClassVar[str] = "nme"

    def bind(self, split: LabelledSplit) -> dict[str, Any]:
        _dense_kind(split, "landmarks")
        return {"points": list(split.label_names)}

    def check(self, split: LabelledSplit) -> None:
        _dense_kind(split, "landmarks")
        _same("points", self.points or [], split.label_names, split)

    @property
    def labels(self) -> list[str]:
        return list(self.points or [])

    def build_head(self, in_features: int) -> nn.Module:
        return HeatmapPoints(self.head(width=in_features, out_channels=self.outputs), self.upscale)

    def targets(self, split: LabelledSplit) -> torch.Tensor:
        fractions, crops = crop_points(split)
        sides = np.asarray([c.side for c in crops], dtype=np.float64)
        norms = np.asarray(split.dense.norms, dtype=np.float64) / sides
        return torch.as_tensor(
            np.concatenate([fractions, np.repeat(norms[:, None, None], 2, axis=2)], axis=1),
            dtype=torch.float32,
        )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(outputs, targets[:, :-1])

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        truth = targets.double().cpu().numpy()
        return {
            **landmark_scores(
                outputs.double().cpu().numpy(),
                truth[:, :-1],
                truth[:, -1, 0],
                self.thresholds or [0.1],
                self.labels,
            ),
            "thresholds": [float(t) for t in self.thresholds or [0.1]],
        }

    def split_scores(self, kept: torch.Tensor, split: LabelledSplit, examples: int = 0) -> dict[str, Any]:
        truth = self.targets(split)
        shown = min(examples, len(split))
        return {
            **self.scores(kept, truth),
            "normaliser": split.dense.normaliser,
            "_examples": {
                "images": _crops(split, shown, 128),
                "true": list(truth[:shown, :-1].numpy()),
                "predicted": list(kept[:shown].cpu().numpy()),
            },
        }
