"""The dense probes on a frozen image tower: face parsing and landmarks.

Both read the patch tokens of chosen blocks (`blocks`, as the token probe names them) of each
face's square crop (flip.evaluation.dense_features) and train a light head on them with the
tower frozen (flip.models.dense_heads):

- `parsing_probe`: a per-token linear classifier (LayerNorm per block, one 1x1 linear map),
  its logits upsampled bilinearly to `label_size`, cross-entropy against the masks there
  (padding ignored). The test split is scored at each label image's own resolution (the
  logits resampled at every label pixel's centre), one confusion matrix over all its pixels:
  FaRL's F1, mean over the foreground classes, and mIoU (flip.evaluation.dense_metrics);
- `landmark_probe`: the same per-token map with one heatmap per point, upsampled and read by
  soft-argmax, L1 on the points as fractions of the crop; NME with the dataset's own
  normaliser, failure rate and AUC at `thresholds`, in image pixels.

Selection is honest, as the other probes': the epoch is chosen on the validation split, or on
a seeded held-out part of train (not refit) where the benchmark has none; the test split is
scored once, with the head of that epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flip.benchmarks.base import LabelledSplit
from flip.benchmarks.dense import IGNORE, points_from_crop
from flip.evaluation.dense_features import (
    DenseCrops,
    benchmark_split,
    crop_points,
    dense_blocks,
    label_maps,
    split_token_maps,
)
from flip.evaluation.dense_fit import DenseSettings, fit_dense_head, predict
from flip.evaluation.dense_metrics import (
    confusion_matrix,
    landmark_scores,
    nme_per_face,
    parsing_scores,
)
from flip.evaluation.features import BenchmarkFeatures, SplitFeatures, model_device
from flip.models import FlipModel
from flip.models.dense_heads import LandmarkHead, TokenMapHead, upsample


@dataclass
class _DenseProbe:
    """Settings shared by both probes (conf/protocol/parsing_probe.yaml, landmark_probe.yaml)."""

    train_split: str
    val_split: str | None = None
    max_train: int | None = None
    max_val: int | None = None
    blocks: Sequence[int | str] | None = None
    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 32
    weight_decay: float = 1e-4
    seed: int = 0
    holdout: float = 0.2
    examples: int = 6

    protocol = ""
    task = ""

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ValueError(f"protocols.{self.protocol}.holdout={self.holdout} must be in (0, 1)")
        self.settings = DenseSettings(self.epochs, self.lr, self.batch_size, self.weight_decay, self.seed)

    def __call__(
        self, model: FlipModel, features: BenchmarkFeatures, checkpoint: str | None = None
    ) -> dict[str, Any]:
        blocks = dense_blocks(model, self.blocks)
        splits = [benchmark_split(features, self.train_split, self.max_train, self.seed)]
        if self.val_split:
            splits.append(benchmark_split(features, self.val_split, self.max_val, self.seed))
        test = benchmark_split(features, None, None, 0)
        for split in (*splits, test):
            if split.task != self.task:
                raise ValueError(
                    f"protocols.{self.protocol} needs a {self.task} benchmark; {split.benchmark}/"
                    f"{split.split} is a {split.task} split"
                )
        train, *val = (split_token_maps(features, s, blocks) for s in splits)
        tested = split_token_maps(features, test, blocks)
        with torch.random.fork_rng(devices=[]):  # the head's init is seeded; the caller's RNG untouched
            torch.manual_seed(self.seed)
            head = self.head(train, model).to(model_device(model))
        metrics = self.fit_and_score(head, train, val[0] if val else None, tested, model)
        metrics.update(
            benchmark=test.benchmark,
            protocol=self.protocol,
            task=self.task,
            checkpoint=checkpoint,
            split=test.split,
            blocks=list(blocks),
            train_split=train.split.split,
            val_split=val[0].split.split if val else None,
            settings={
                "epochs": self.epochs,
                "lr": self.lr,
                "batch_size": self.batch_size,
                "weight_decay": self.weight_decay,
                "seed": self.seed,
            },
        )
        return metrics

    def held_out(self, train: SplitFeatures) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(rows to train on, rows to choose the epoch on, what chose it): a seeded `holdout` share
        of train, for a benchmark without a validation split."""
        n = len(train.split)
        order = np.random.default_rng(self.seed + 1).permutation(n)
        held = max(1, round(self.holdout * n))
        return (
            torch.as_tensor(np.sort(order[held:])),
            torch.as_tensor(np.sort(order[:held])),
            f"held-out {self.holdout:.0%} of {train.split.split} (not refit)",
        )

    def head(self, train: SplitFeatures, model: FlipModel) -> torch.nn.Module:
        raise NotImplementedError

    def fit_and_score(self, head, train, val, test, model) -> dict[str, Any]:
        raise NotImplementedError


def _examples(split: LabelledSplit, count: int, size: int) -> list[np.ndarray]:
    crops = DenseCrops(split.images, split.dense)
    return [np.asarray(crops.load(i).resize((size, size))) for i in range(min(count, len(split)))]


@dataclass
class ParsingProbe(_DenseProbe):
    """The parsing probe (conf/protocol/parsing_probe.yaml); `label_size`: the side of the label
    maps it trains and selects on (None: the tower's input size)."""

    label_size: int | None = None
    protocol = "parsing_probe"
    task = "parsing"

    def head(self, train: SplitFeatures, model: FlipModel) -> TokenMapHead:
        _, blocks, width, _, _ = train.features.shape
        return TokenMapHead(blocks, width, len(train.split.label_names))

    def _size(self, model: FlipModel) -> int:
        return int(self.label_size or model.clip.visual.image_size[0])

    def _confusion(self, head, maps: torch.Tensor, labels: np.ndarray, rows, classes: int) -> np.ndarray:
        """The confusion matrix of `maps[rows]` against their label maps, at the label size
        (in chunks: the upsampled logits of a whole split need not fit in memory)."""
        rows = torch.arange(len(maps)) if rows is None else rows
        confusion = np.zeros((classes, classes), dtype=np.int64)
        for chunk in rows.split(64):
            predicted = upsample(predict(head, maps, chunk), labels.shape[-1]).argmax(dim=1).numpy()
            confusion += confusion_matrix(labels[chunk.numpy()], predicted, classes)
        return confusion

    def fit_and_score(self, head, train, val, test, model) -> dict[str, Any]:
        size, classes = self._size(model), len(test.split.label_names)
        names = test.split.label_names
        train_labels = label_maps(train.split, size)
        targets = torch.from_numpy(train_labels)  # uint8: a class index per pixel, long per batch
        if val is None:
            fit_rows, check_rows, chosen_on = self.held_out(train)
            check_maps, check_labels = train.features, train_labels
        else:
            fit_rows, check_rows, chosen_on = torch.arange(len(train.split)), None, val.split.split
            check_maps, check_labels = val.features, label_maps(val.split, size)
        device = next(head.parameters()).device

        def loss(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(
                upsample(logits, size), targets[rows].to(device).long(), ignore_index=IGNORE
            )

        def score(h) -> float:
            confusion = self._confusion(h, check_maps, check_labels, check_rows, classes)
            return parsing_scores(confusion, names)["summary"]["mean_f1"]

        fitted = fit_dense_head(head, train.features, fit_rows, loss, score, self.settings)
        confusion, shown = self.score_test(fitted.head, test)
        scored = parsing_scores(confusion, names)
        logits = predict(fitted.head, test.features[: self.examples])
        return {
            "n_train": len(fit_rows),
            "n_test": len(test.split),
            "labels": list(names),
            **scored,
            "confusion_matrix": confusion.tolist(),
            "selected": {"epoch": fitted.epoch, "on": chosen_on, "scores": fitted.scores},
            "head": "per-token linear (LayerNorm per block, 1x1 linear), bilinear upsampling",
            "label_size": size,
            "scored_at": "each test label image's own resolution",
            "_examples": {
                "images": _examples(test.split, self.examples, size),
                "true": list(label_maps(test.split.subset(range(shown)), size)),
                "predicted": list(upsample(logits, size).argmax(dim=1).numpy().astype(np.uint8)),
                "classes": list(names),
            },
        }

    def score_test(self, head, test: SplitFeatures) -> tuple[np.ndarray, int]:
        """The confusion matrix over every pixel of every test label image: the head's logits
        resampled (bilinear) at each label pixel's centre, through the face's crop."""
        split, classes = test.split, len(test.split.label_names)
        crops = DenseCrops(split.images, split.dense)
        confusion = np.zeros((classes, classes), dtype=np.int64)
        for start in range(0, len(split), 32):
            rows = torch.arange(start, min(start + 32, len(split)))
            logits = predict(head, test.features, rows)
            for offset, i in enumerate(rows.tolist()):
                mask = split.dense.masks.load(i)
                (width, height), crop = split.images.size(i), crops.crop(i)
                xs = ((np.arange(mask.shape[1]) + 0.5) * width / mask.shape[1] - crop.x0) / crop.side
                ys = ((np.arange(mask.shape[0]) + 0.5) * height / mask.shape[0] - crop.y0) / crop.side
                grid = torch.stack(
                    torch.meshgrid(torch.as_tensor(xs * 2 - 1), torch.as_tensor(ys * 2 - 1), indexing="xy"),
                    dim=-1,
                ).float()
                # border padding: the edge values continue past the grid, as `upsample` has them
                sampled = F.grid_sample(
                    logits[offset : offset + 1],
                    grid[None],
                    mode="bilinear",
                    padding_mode="border",
                    align_corners=False,
                )
                confusion += confusion_matrix(mask, sampled[0].argmax(dim=0).numpy(), classes)
        return confusion, min(self.examples, len(split))


@dataclass
class LandmarkProbe(_DenseProbe):
    """The landmark probe (conf/protocol/landmark_probe.yaml): `thresholds` for the failure rate
    and AUC (each dataset's usual ones, from its conf/benchmark file), `upscale` the heatmaps'
    size over the token grid."""

    thresholds: Sequence[float] = (0.1,)
    upscale: int = 4
    protocol = "landmark_probe"
    task = "landmarks"

    def head(self, train: SplitFeatures, model: FlipModel) -> LandmarkHead:
        _, blocks, width, _, _ = train.features.shape
        return LandmarkHead(blocks, width, len(train.split.label_names), self.upscale)

    def fit_and_score(self, head, train, val, test, model) -> dict[str, Any]:
        train_points, _ = crop_points(train.split)
        targets = torch.as_tensor(train_points, dtype=torch.float32)
        if val is None:
            fit_rows, check_rows, chosen_on = self.held_out(train)
            check = train.split.subset(check_rows.numpy())
            check_maps = train.features[check_rows]
        else:
            fit_rows, chosen_on, check, check_maps = (
                torch.arange(len(train.split)),
                val.split.split,
                val.split,
                val.features,
            )
        device = next(head.parameters()).device
        check_crops = crop_points(check)[1]

        def loss(points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return F.l1_loss(points, targets[rows].to(device))

        def image_points(h, maps: torch.Tensor, crops) -> np.ndarray:
            fractions = predict(h, maps).double().numpy()
            return np.stack([points_from_crop(f, c) for f, c in zip(fractions, crops, strict=True)])

        def score(h) -> float:
            errors = nme_per_face(
                image_points(h, check_maps, check_crops), check.dense.points, check.dense.norms
            )
            return -float(errors.mean())

        fitted = fit_dense_head(head, train.features, fit_rows, loss, score, self.settings)
        test_fractions, test_crops = crop_points(test.split)
        predicted = image_points(fitted.head, test.features, test_crops)
        dense = test.split.dense
        scored = landmark_scores(predicted, dense.points, dense.norms, self.thresholds, dense.names)
        size = int(model.clip.visual.image_size[0])
        shown = min(self.examples, len(test.split))
        return {
            "n_train": len(fit_rows),
            "n_test": len(test.split),
            "labels": list(dense.names),
            **scored,
            "normaliser": dense.normaliser,
            "thresholds": [float(t) for t in self.thresholds],
            "selected": {"epoch": fitted.epoch, "on": chosen_on, "scores": [-s for s in fitted.scores]},
            "selected_by": "mean NME (lower is better; `scores` are NMEs)",
            "head": "per-token linear heatmaps (LayerNorm per block, 1x1 linear), soft-argmax",
            "_examples": {
                "images": _examples(test.split, shown, size),
                "true": list(test_fractions[:shown]),
                "predicted": [
                    (p - np.asarray([c.x0, c.y0])) / c.side
                    for p, c in zip(predicted[:shown], test_crops[:shown], strict=True)
                ],
            },
        }
