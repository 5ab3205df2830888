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
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from webdataset.autodecode import DecodingError
from webdataset.utils import pytorch_worker_info

log = logging.getLogger(__name__)

IMAGE_KEYS = "jpg;jpeg;png;webp"
TEXT_KEYS = "txt;text;caption"


def skip_reason(exn: BaseException) -> str:
    """A short reason for a skipped sample, in the words of `flip-data`'s report where they apply.

    webdataset wraps decoder failures in a `DecodingError` with no message; the cause says why.
    """
    cause = exn.__cause__ if isinstance(exn, DecodingError) and exn.__cause__ is not None else exn
    text = str(cause).lower()
    if isinstance(cause, UnicodeDecodeError):  # before the tar test: its message can say "end of data"
        return "non_utf8_caption"
    if isinstance(cause, tarfile.ReadError | EOFError) or "unexpected end of data" in text:
        return "truncated_tar"
    if isinstance(cause, Image.DecompressionBombError):
        return "decompression_bomb"
    if isinstance(cause, UnidentifiedImageError):
        return "corrupt_image"
    if isinstance(cause, OSError) and "truncated" in text:
        return "truncated_image"
    if isinstance(cause, ValueError) and ("cannot find" in text or "didn't find" in text):
        return "missing_field"  # e.g. an image without its .txt caption
    return type(cause).__name__


class SkipCounter:
    """A webdataset handler that skips a bad sample or shard, counts it by reason and keeps going.

    A corrupt JPEG or a truncated tar in a 10M-sample run must cost one sample, not the run.
    Counts are per process (each loader worker has its own copy) and are logged as they happen,
    with the reason, the running counts by reason, and the sample's key and shard when known.
    """

    def __init__(self) -> None:
        self.skipped = 0
        self.by_reason: Counter[str] = Counter()

    def __call__(self, exn: BaseException) -> bool:
        reason = skip_reason(exn)
        self.skipped += 1
        self.by_reason[reason] += 1
        where = ""
        if isinstance(exn, DecodingError):
            where = f" {exn.key!r} in {exn.url}"
            exn = exn.__cause__ or exn
        log.warning(
            "skipped a bad sample%s: %s (%s: %s); skipped so far: %s",
            where,
            reason,
            type(exn).__name__,
            str(exn)[:300],
            ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items())),
        )
        return True


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
class SampleTransform:
    """Turns a decoded sample into (image tensor, token ids); picklable for loader workers."""

    preprocess: Callable
    tokenizer: Callable

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        seed = sample.get("__seed__")
        if seed is None:
            image = self.preprocess(sample["image"])
        else:
            with seeded_augmentation(seed):
                image = self.preprocess(sample["image"])
        return image, self.tokenizer([sample["text"]])[0]


@contextmanager
def seeded_augmentation(seed: int):
    """Random transforms draw from generators seeded by the sample, then the global ones resume.

    torchvision draws from torch's CPU generator and some transforms (timm's) from Python's
    `random`; both are restored after, so training randomness does not depend on the data.
    """
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


def _decode_stages(handler: SkipCounter, metadata: bool = True) -> list:
    # without metadata only the image and caption are decoded: a sample's .json (FaceShapes
    # keeps ~1 kB of attributes there, img2dataset the url, exif, ...) would be parsed for nothing
    only = None if metadata else [*IMAGE_KEYS.split(";"), *TEXT_KEYS.split(";")]
    return [
        wds.decode("pilrgb", handler=handler, only=only),
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
        EpochResampledShards(list(urls), seed=seed, worker_seed=epoch_seed, deterministic=True),
        wds.tarfile_to_samples(handler=handler),
        SeededShuffle(shuffle_buffer, min(shuffle_buffer, 4 * batch_size), seed, epoch_seed),
        SkipConsumed(batch_size, seed, epoch_seed),
        *_decode_stages(handler, metadata=False),
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
