"""webdataset pipelines for (image, caption) shards, in the layout img2dataset writes.

Training streams resampled shards (with replacement), which keeps every rank and worker busy
for any shard count and makes an "epoch" a number of samples rather than a pass over files.
Evaluation reads every sample once; across ranks in equal shares, so that ranks that
all-gather in `validation_step` stay in step.

Every pipeline reads shards through `ReadShards` and decodes through `DecodeSamples`, which use
`flip.data.shards` only: images, captions and `.json`, never webdataset's default
decoders (which unpickle `.pyd`/`.pth`/... members).
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
from PIL import Image
from webdataset.utils import pytorch_worker_info

from flip.data.cache import SampleCache
from flip.data.shards import ShardError, decode_sample, iter_tar_samples
from flip.data.skips import DEFAULT_MAX_CONSECUTIVE_SKIPS, NoUsableSamples, SkipCounter, skip_reason
from flip.data.transform import SampleTransform, seeded_augmentation

__all__ = [
    "EpochSeed",
    "NoUsableSamples",
    "SampleTransform",
    "SkipCounter",
    "eval_pipeline",
    "make_loader",
    "seeded_augmentation",
    "skip_reason",
    "train_pipeline",
]

log = logging.getLogger(__name__)


class ReadShards(wds.PipelineStage):
    """Shard urls -> samples of raw bytes, holding only the members FLIP decodes (`shards.reading`).

    Replaces webdataset's `tarfile_to_samples`, so no member beyond images, captions and `.json`
    is even read, and a damaged shard is counted under its own reason (`not_a_tar`,
    `truncated_tar`) by `skips`, which also learns of every complete read of a shard. With a
    `cache`, a shard read through once is served from memory after.
    """

    def __init__(self, skips: SkipCounter, cache: SampleCache | None = None) -> None:
        self.skips, self.cache = skips, cache

    def run(self, src):
        for source in src:
            url = source["url"] if isinstance(source, dict) else str(source)
            cached = None if self.cache is None else self.cache.shard(url)
            if cached is not None:
                yield from (dict(sample) for sample in cached)
                self.skips.shard_read(url, len(cached))
                continue
            read, kept = 0, [] if self.cache is not None else None
            try:
                for key, fields in iter_tar_samples(url):
                    read += 1
                    sample = {"__key__": key, "__url__": url, **fields}
                    if kept is not None:  # a copy: later stages may change the dict they get
                        kept.append(dict(sample))
                    yield sample
            except ShardError as exc:
                self.skips(exc)
            else:
                if kept is not None:
                    self.cache.keep_shard(url, kept)
            self.skips.shard_read(url, read)


PAD = "__pad__"


class DecodeSamples(wds.PipelineStage):
    """Raw samples -> transformed ones, through `shards.decode_sample` only.

    This is the one decoding step of every pipeline: images by PIL, captions as UTF-8, `.json`
    by `json.loads` (with `with_json`), nothing else. A sample that fails is counted by `skips`
    and dropped, or, with `pad_failures`, replaced by a blank one (see `EqualShare`). With
    `at_least` (the transform's `decode_size`), large JPEGs decode at reduced scale. With a
    `cache`, each sample is decoded once and its decoded form reused.
    """

    def __init__(
        self,
        transform: Callable,
        skips: SkipCounter,
        with_json: bool = False,
        pad_failures: bool = False,
        at_least: tuple[int, int] | None = None,
        cache: SampleCache | None = None,
    ) -> None:
        self.transform, self.skips, self.cache = transform, skips, cache
        self.with_json, self.pad_failures, self.at_least = with_json, pad_failures, at_least
        self._blank = None

    def blank(self):
        """A white image with an empty caption, through the same transform: shapes as a real sample's."""
        if self._blank is None:
            sample = {"__key__": "", "__url__": "", "image": Image.new("RGB", (8, 8), "white"), "text": ""}
            self._blank = self.transform(sample)
        return self._blank

    def run(self, src):
        for raw in src:
            key, url = raw.get("__key__"), raw.get("__url__")
            if raw.get(PAD):
                yield self.blank()
                continue
            try:
                sample = self._decode(raw, key, url)
                sample.update(__key__=key, __url__=url, __seed__=raw.get("__seed__"))
                output = self.transform(sample)
            except Exception as exc:
                self.skips(exc, key, url)
                if self.pad_failures:
                    yield self.blank()
                continue
            self.skips.usable(url)
            yield output

    def _decode(self, raw: dict, key: str, url: str) -> dict:
        sample = None if self.cache is None else self.cache.decoded(url, key)
        if sample is None:
            sample = decode_sample(raw, with_json=self.with_json, at_least=self.at_least)
            if self.cache is not None:
                self.cache.keep_decoded(url, key, sample)
        return sample


class EqualShare(wds.PipelineStage):
    """This rank's and worker's share of a validation set: exactly `per_rank` samples on every rank.

    Under DDP or ZeRO, `validation_step` all-gathers features, so every rank must run the same
    number of batches of the same sizes. Sample `i` of the whole set (in shard order) goes to
    rank `i % world_size`; the `len % world_size` samples left over are not used, so each used
    sample is seen exactly once. A rank whose share comes up short (a sample that fails to
    decode there, a shard that ends early) is topped up with blank samples (`DecodeSamples`
    pads failures too), which keeps the ranks in step. Each loader worker reads every shard
    and keeps every `num_workers`-th sample of its rank's share.
    """

    def __init__(self, rank: int, world_size: int, per_rank: int) -> None:
        self.rank, self.world_size, self.per_rank = rank, world_size, per_rank

    def run(self, src):
        _, _, worker, num_workers = pytorch_worker_info()
        mine = range(worker, self.per_rank, num_workers)
        given = 0
        for index, sample in enumerate(src):
            if index % self.world_size != self.rank:
                continue
            position = index // self.world_size
            if position >= self.per_rank:
                break
            if position % num_workers == worker:
                given += 1
                yield sample
        for _ in range(given, len(mine)):
            yield {"__key__": PAD, PAD: True}


class EpochSeed:
    """Per-rank, per-worker shard-sampling seed that also changes with the epoch.

    Loader workers hold copies of the dataset, so the epoch must live in shared memory for a
    new epoch to draw a new shard order (as open_clip's SharedEpoch does).

    It also knows where a restarted run resumes (`resume`): how many batches of the epoch the
    rank had consumed. The loader hands out batches from its workers in turn, so the resumed
    loader's first worker takes the role ("logical worker") of the one that would have
    delivered the next batch, and each worker skips the batches its role had delivered.
    """

    def __init__(self) -> None:
        self.epoch = mp.Value("i", 0)
        self.resume_epoch = mp.Value("i", -1)
        self.resume_batches = mp.Value("i", 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.value = epoch

    def resume(self, epoch: int, batches: int) -> None:
        """The next iteration continues `epoch` after the `batches` this rank had consumed."""
        self.epoch.value, self.resume_epoch.value, self.resume_batches.value = epoch, epoch, batches

    def consumed(self) -> int:
        """Batches of the current epoch consumed before a restart (0 when not resuming it)."""
        return self.resume_batches.value if self.resume_epoch.value == self.epoch.value else 0

    def worker(self) -> tuple[int, int, int]:
        """(rank, logical worker, number of workers) of the calling process."""
        rank, _, worker, num_workers = pytorch_worker_info()
        return rank, (worker + self.consumed()) % num_workers, num_workers

    def batches_to_skip(self) -> int:
        _, logical, num_workers = self.worker()
        consumed = self.consumed()
        return consumed // num_workers + (logical < consumed % num_workers)

    def __call__(self) -> int:
        rank, logical, _ = self.worker()
        return rank * 1000 + logical + 1_000_003 * self.epoch.value


class EpochResampledShards(wds.ResampledShards):
    """`ResampledShards` whose draws depend on the epoch in `EpochSeed` only.

    webdataset also counts its own iterations of the object into the seed; a restarted run
    starts that count again at 0 and would draw other shards than the run it continues.
    """

    def __iter__(self):
        self.epoch = -1  # the first draw counts it up to 0
        return super().__iter__()


class SkipConsumed(wds.PipelineStage):
    """Drops the samples a restarted run had trained on, and seeds each sample's augmentation.

    It sits after the seeded shuffle and before decoding: the order is already the original
    one, and skipped samples cost a tar read, not a JPEG decode. Each sample's `__seed__`
    comes from its position in this worker's stream, so its random crop is the same whether
    the run was restarted or not, whichever worker or process makes it. (A sample that fails
    to decode shifts batch boundaries by one, so after a restart the stream can be off by the
    number of such samples before the resume point.)
    """

    def __init__(self, batch_size: int, seed: int, epoch_seed: EpochSeed) -> None:
        self.batch_size, self.seed, self.epoch_seed = batch_size, seed, epoch_seed

    def run(self, src):
        skip = self.epoch_seed.batches_to_skip() * self.batch_size
        stream = self.epoch_seed()
        for position, sample in enumerate(src):
            if position >= skip:
                sample["__seed__"] = hash((self.seed, stream, position)) & 0x7FFF_FFFF_FFFF_FFFF
                yield sample


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
class WithMetadata:
    """Keeps each sample's key and `.json` beside its tensors, for labelled evaluation."""

    transform: Callable

    def __call__(self, sample: dict) -> tuple:
        return (*self.transform(sample), sample.get("__key__", ""), sample.get("json", {}))


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
    max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    cache_in_memory: bool = False,
    with_json: bool = False,
) -> tuple[wds.DataPipeline, int]:
    """An endless resampled stream cut into epochs of `samples_per_epoch` (global) samples.

    Returns the pipeline and the number of batches each rank sees per epoch. A stream with no
    usable sample stops with `NoUsableSamples` (see `SkipCounter`) instead of resampling forever.
    `cache_in_memory` keeps read shards and decoded images in memory (`SampleCache`);
    `with_json` decodes each sample's `.json` too (the caption grammar's record, for foils).
    """
    skips = SkipCounter(urls, max_consecutive_skips)
    cache = SampleCache() if cache_in_memory else None
    batches_per_rank = max(1, math.ceil(samples_per_epoch / (batch_size * world_size)))
    batches_per_worker = math.ceil(batches_per_rank / max(1, num_workers))
    pipeline = wds.DataPipeline(
        EpochResampledShards(list(urls), seed=seed, worker_seed=epoch_seed, deterministic=True),
        ReadShards(skips, cache),
        SeededShuffle(shuffle_buffer, min(shuffle_buffer, 4 * batch_size), seed, epoch_seed),
        SkipConsumed(batch_size, seed, epoch_seed),
        # per sample the PIL work, per batch the float conversion and the tokenizer (`SampleTransform`)
        DecodeSamples(
            transform.prepare, skips, with_json=with_json, at_least=transform.decode_size, cache=cache
        ),
        wds.batched(batch_size, partial=False, collation_fn=transform.collate),
    ).with_epoch(batches_per_worker)
    return pipeline, batches_per_rank


def count_samples(urls: Sequence[str]) -> tuple[int, dict[str, str]]:
    """Samples in the shards, as `ReadShards` will yield them (headers only), and why shards failed."""
    count, failures = 0, {}
    for url in urls:
        try:
            for _ in iter_tar_samples(url, read_data=False):
                count += 1
        except ShardError as exc:
            failures[url] = f"{exc.reason}: {exc.detail}"
    return count, failures


def eval_pipeline(
    urls: Sequence[str],
    transform: SampleTransform | Callable,
    batch_size: int,
    keep_metadata: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> wds.DataPipeline:
    """Every sample once, in shard order; on one process split by worker, across ranks in equal shares.

    With `keep_metadata` each batch also carries the samples' keys and `.json` metadata, which
    evaluation needs for labels. With `world_size > 1` every rank gets the same number of
    samples, so the same number of batches of the same sizes (see `EqualShare`); the samples
    are counted first, which reads the shards' headers once.
    """
    # across ranks, a rank whose share is all bad pads it (stopping alone would strand the others)
    skips = SkipCounter(urls if world_size == 1 else (), max_consecutive=None)
    stages: list = [wds.SimpleShardList(list(urls))]
    if world_size > 1:
        total, failures = count_samples(urls)
        per_rank = total // world_size
        if per_rank == 0:
            raise NoUsableSamples(
                f"data.val_shards: {total} sample(s) in {len(urls)} shard(s) cannot be shared among "
                f"{world_size} ranks (each needs one at least); unreadable: {failures or 'none'}"
            )
        if rank == 0 and total % world_size:
            log.warning(
                "validation uses %d of its %d samples: %d ranks take %d each and the last %d are left out",
                per_rank * world_size, total, world_size, per_rank, total % world_size,
            )  # fmt: skip
        stages += [ReadShards(skips), EqualShare(rank, world_size, per_rank)]
    else:
        stages += [wds.split_by_worker, ReadShards(skips)]
    padded = world_size > 1
    if keep_metadata:
        stages.append(DecodeSamples(WithMetadata(transform), skips, with_json=True, pad_failures=padded))
        stages.append(wds.batched(batch_size, partial=True, collation_fn=_collate_with_metadata))
    else:
        stages.append(DecodeSamples(transform, skips, pad_failures=padded))
        stages.append(wds.batched(batch_size, partial=True))
    return wds.DataPipeline(*stages)


def _collate_with_metadata(samples: list) -> tuple:
    images, texts, keys, metadata = zip(*samples, strict=True)
    return torch.stack(images), torch.stack(texts), list(keys), list(metadata)


class ResumableLoader(wds.WebLoader):
    """A training loader that checkpoints where its stream stands: epoch and batches consumed.

    Lightning saves `state_dict()` in checkpoints and calls `load_state_dict()` on resume
    before the first batch; the stream then continues after the batches already trained on,
    instead of starting the epoch's first shards again (see `EpochSeed`, `SkipConsumed`).
    """

    def __init__(self, *args, epoch_seed: EpochSeed, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_seed = epoch_seed
        self.consumed = 0

    def __iter__(self):
        self.consumed = self.epoch_seed.consumed()
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch_seed.epoch.value), "batches": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        size = getattr(self, "size", None)
        if size is not None and batches >= size:  # saved at the end of an epoch: the next one starts
            epoch, batches = epoch + 1, 0
        self.epoch_seed.resume(epoch, batches)


def make_loader(
    pipeline: wds.DataPipeline,
    num_workers: int,
    num_batches: int | None = None,
    epoch_seed: EpochSeed | None = None,
) -> wds.WebLoader:
    """A loader over `pipeline`; with `epoch_seed` (training) one that resumes mid-epoch."""
    kind, extra = (wds.WebLoader, {}) if epoch_seed is None else (ResumableLoader, {"epoch_seed": epoch_seed})
    loader = kind(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # every new iterator draws a base seed; from its own generator, not the global one, so
        # that starting a loader (at a resume, or for validation) leaves training randomness alone
        generator=torch.Generator().manual_seed(0),
        **extra,
    )
    return loader.with_length(num_batches, silent=True) if num_batches is not None else loader
