"""webdataset pipelines for (image, caption) shards, in the layout img2dataset writes.

Training streams resampled shards (with replacement), which keeps every rank and worker busy
for any shard count and makes an "epoch" a number of samples rather than a pass over files.
Evaluation reads each shard exactly once, split across ranks and workers, so that metrics
see every sample once.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_seed

log = logging.getLogger(__name__)

IMAGE_KEYS = "jpg;jpeg;png;webp"
TEXT_KEYS = "txt;text;caption"


class SkipCounter:
    """A webdataset handler that skips a bad sample or shard, counts it and keeps going.

    A corrupt JPEG or a truncated tar in a 10M-sample run must cost one sample, not the run.
    Counts are per process (each loader worker has its own copy) and are logged as they happen.
    """

    def __init__(self) -> None:
        self.skipped = 0

    def __call__(self, exn: BaseException) -> bool:
        self.skipped += 1
        log.warning("skipped a bad sample (%s: %s); %d skipped so far", type(exn).__name__, exn, self.skipped)
        return True


class EpochSeed:
    """Per-rank, per-worker shard-sampling seed that also changes with the epoch.

    Loader workers hold copies of the dataset, so the epoch must live in shared memory for a
    new epoch to draw a new shard order (as open_clip's SharedEpoch does).
    """

    def __init__(self) -> None:
        self.epoch = mp.Value("i", 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.value = epoch

    def __call__(self) -> int:
        return pytorch_worker_seed() + 1_000_003 * self.epoch.value


class SeededShuffle(wds.PipelineStage):
    """Shuffle buffer seeded per rank, worker and epoch, so runs are reproducible.

    webdataset's `shuffle` seeds from the clock, and its `detshuffle` gives every worker the
    same seed.
    """

    def __init__(self, bufsize: int, initial: int, seed: int, epoch_seed: EpochSeed) -> None:
        self.bufsize, self.initial, self.seed, self.epoch_seed = bufsize, initial, seed, epoch_seed

    def run(self, src):
        rng = random.Random(f"{self.seed}-{self.epoch_seed()}")
        return wds.shuffle(self.bufsize, self.initial, rng=rng)(src)


@dataclass
class SampleTransform:
    """Turns a decoded sample into (image tensor, token ids); picklable for loader workers."""

    preprocess: Callable
    tokenizer: Callable

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.preprocess(sample["image"]), self.tokenizer([sample["text"]])[0]


def _decode_stages(handler: SkipCounter) -> list:
    return [
        wds.decode("pilrgb", handler=handler),
        wds.rename(image=IMAGE_KEYS, text=TEXT_KEYS, handler=handler),
    ]


@dataclass
class WithMetadata:
    """Keeps each sample's key and `.json` beside its tensors, for labelled evaluation."""

    transform: Callable

    def __call__(self, sample: dict) -> tuple:
        return (*self.transform(sample), sample["__key__"], sample.get("json", {}))


def train_pipeline(
    urls: Sequence[str],
    transform: SampleTransform,
    batch_size: int,
    samples_per_epoch: int,
    world_size: int,
    num_workers: int,
    shuffle_buffer: int,
    seed: int,
    epoch_seed: EpochSeed,
) -> tuple[wds.DataPipeline, int]:
    """An endless resampled stream cut into epochs of `samples_per_epoch` (global) samples.

    Returns the pipeline and the number of batches each rank sees per epoch.
    """
    handler = SkipCounter()
    batches_per_rank = max(1, math.ceil(samples_per_epoch / (batch_size * world_size)))
    batches_per_worker = math.ceil(batches_per_rank / max(1, num_workers))
    pipeline = wds.DataPipeline(
        wds.ResampledShards(list(urls), seed=seed, worker_seed=epoch_seed, deterministic=True),
        wds.tarfile_to_samples(handler=handler),
        SeededShuffle(shuffle_buffer, min(shuffle_buffer, 4 * batch_size), seed, epoch_seed),
        *_decode_stages(handler),
        wds.map(transform, handler=handler),
        wds.batched(batch_size, partial=False),
    ).with_epoch(batches_per_worker)
    return pipeline, batches_per_rank


def eval_pipeline(
    urls: Sequence[str], transform: SampleTransform | Callable, batch_size: int, keep_metadata: bool = False
) -> wds.DataPipeline:
    """Every sample once, in shard order, split by rank then by worker.

    With `keep_metadata` each batch also carries the samples' keys and `.json` metadata, which
    evaluation needs for labels.
    """
    handler = SkipCounter()
    stages = [
        wds.SimpleShardList(list(urls)),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=handler),
        *_decode_stages(handler),
    ]
    if keep_metadata:
        stages.append(wds.map(WithMetadata(transform), handler=handler))
        stages.append(wds.batched(batch_size, partial=True, collation_fn=_collate_with_metadata))
    else:
        stages.append(wds.map(transform, handler=handler))
        stages.append(wds.batched(batch_size, partial=True))
    return wds.DataPipeline(*stages)


def _collate_with_metadata(samples: list) -> tuple:
    images, texts, keys, metadata = zip(*samples, strict=True)
    return torch.stack(images), torch.stack(texts), list(keys), list(metadata)


def make_loader(
    pipeline: wds.DataPipeline, num_workers: int, num_batches: int | None = None
) -> wds.WebLoader:
    loader = wds.WebLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    return loader.with_length(num_batches, silent=True) if num_batches is not None else loader
