"""A benchmark's labelled splits as fine-tuning batches: (images, targets), resumable mid-epoch.

Training batches follow a permutation seeded by (seed, epoch); each image's augmentation is
seeded by (seed, epoch, sample), so the batches of a run depend on nothing but its seed: not on
the number of loader workers, nor on where a run was interrupted. The loader records how many
batches of the epoch it has handed out; Lightning saves that in checkpoints and gives it back on
resume, and the next batch is the one the uninterrupted run would have taken (as pretraining's
`flip.data.pipeline.ResumableLoader` does for shards).

With several ranks, each global batch of `batch_size * world_size` samples is cut into one part
per rank. Workers take whole batches in turn (worker w the batches w, w + W, ...), which is the
order a DataLoader hands them out in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from flip.benchmarks.base import ImageSource, LabelledSplit
from flip.data.transform import seeded_augmentation

log = logging.getLogger(__name__)
UNREADABLE = (OSError, ValueError, SyntaxError)  # PIL's errors for a missing or corrupt image


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch`: one number per (seed, epoch, sample)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class TrainingBatches(IterableDataset):
    """Shuffled batches of one split for one rank; `epoch` and `skip` (batches already consumed) are
    set before each pass, and travel to the workers with the dataset."""

    def __init__(
        self,
        split: LabelledSplit,
        targets: torch.Tensor,
        transform: Callable,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        images: ImageSource | None = None,
    ) -> None:
        super().__init__()
        self.split, self.targets, self.transform = split, targets, transform
        self.images = split.images if images is None else images  # a dense task's: the face crops
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.skip = 0, 0
        if len(self) == 0:
            raise ValueError(
                f"{split.benchmark}/{split.split} has {len(split)} samples, fewer than one batch of "
                f"data.batch_size={batch_size} x {world_size} rank(s); lower data.batch_size"
            )

    def __len__(self) -> int:
        return len(self.split) // (self.batch_size * self.world_size)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.split))

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        """This rank's sample indices of batch `batch` of `epoch`."""
        start = (batch * self.world_size + self.rank) * self.batch_size
        return self.order(epoch)[start : start + self.batch_size]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch in range(self.skip + worker, len(self), workers):
            images, kept = [], []
            for index in self.indices(self.epoch, batch).tolist():
                try:
                    image = self.images.load(index)
                except UNREADABLE as exc:
                    log.warning("skipped unreadable image %s (%s)", self.images.describe(index), exc)
                    continue
                with seeded_augmentation(sample_seed(self.seed, self.epoch, index)):
                    images.append(self.transform(image))
                kept.append(index)
            if kept:
                yield torch.stack(images), self.targets[kept]


def own_generator(seed: int) -> torch.Generator:
    """A generator for a DataLoader's own draw. Each pass of a DataLoader draws its workers' base
    seed, from the global generator unless it is given one; a resumed run would then draw once more
    than the uninterrupted one (when it makes its first iterator after restoring the generators)
    and every dropout mask after would differ. Nothing here uses that seed: batches and their
    augmentations are seeded by sample."""
    return torch.Generator().manual_seed(seed)


class ResumableBatches(DataLoader):
    """The training loader: Lightning saves `state_dict()` in checkpoints and calls
    `load_state_dict()` on resume, before the first batch."""

    def __init__(self, dataset: TrainingBatches, num_workers: int, **kwargs: Any) -> None:
        kwargs.setdefault("generator", own_generator(dataset.seed))
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)
        self.consumed = 0

    def __iter__(self):
        dataset: TrainingBatches = self.dataset
        self.consumed = dataset.skip
        for batch in super().__iter__():
            self.consumed += 1
            yield batch
        dataset.skip = 0  # the next pass starts at the top of its epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.dataset.epoch:
            self.dataset.epoch, self.dataset.skip = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.dataset.epoch), "batches": int(self.consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self.dataset):  # saved at the end of an epoch: the next one starts
            epoch, batches = epoch + 1, 0
        self.dataset.epoch, self.dataset.skip = epoch, batches


class EvaluationImages(Dataset):
    """(image, targets) per sample, with the evaluation transform; an unreadable image gives None."""

    def __init__(
        self,
        split: LabelledSplit,
        targets: torch.Tensor,
        transform: Callable,
        images: ImageSource | None = None,
    ) -> None:
        self.split, self.targets, self.transform = split, targets, transform
        self.images = split.images if images is None else images

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        try:
            return self.transform(self.images.load(index)), self.targets[index]
        except UNREADABLE as exc:
            log.warning("skipped unreadable image %s (%s)", self.images.describe(index), exc)
            return None


def _collate_readable(samples: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    return torch.stack([s[0] for s in kept]), torch.stack([s[1] for s in kept])


class FinetuneDataModule(L.LightningDataModule):
    """The training split (shuffled, augmented with `train_transform`) and the validation split
    (`eval_transform`), each with the targets the task reads; `val` None: no validation."""

    def __init__(
        self,
        train: LabelledSplit,
        val: LabelledSplit | None,
        targets: Callable[[LabelledSplit], torch.Tensor],
        train_transform: Callable,
        eval_transform: Callable,
        batch_size: int,
        val_batch_size: int,
        num_workers: int,
        seed: int,
        images: Callable[[LabelledSplit], ImageSource] | None = None,
    ) -> None:
        super().__init__()
        self.train, self.val, self.targets = train, val, targets
        self.images = images or (lambda split: split.images)  # what the tower sees of a split
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size, self.val_batch_size, self.num_workers, self.seed = (
            batch_size, val_batch_size, num_workers, seed,
        )  # fmt: skip
        self._train_loader: ResumableBatches | None = None

    def train_dataloader(self) -> ResumableBatches:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches = TrainingBatches(
            self.train,
            self.targets(self.train),
            self.train_transform,
            self.batch_size,
            self.seed,
            rank,
            world,
            self.images(self.train),
        )
        self._train_loader = ResumableBatches(batches, self.num_workers)
        return self._train_loader

    def set_epoch(self, epoch: int) -> None:
        if self._train_loader is not None:
            self._train_loader.set_epoch(epoch)

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        images = EvaluationImages(
            self.val, self.targets(self.val), self.eval_transform, self.images(self.val)
        )
        return DataLoader(
            images,
            batch_size=self.val_batch_size,
            num_workers=self.num_workers,
            collate_fn=_collate_readable,
            generator=own_generator(self.seed),
        )
