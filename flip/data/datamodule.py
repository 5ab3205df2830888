"""Lightning data modules over (image, caption) webdataset shards.

The model owns its image transforms and tokenizer (they come from open_clip with the towers),
so a data module is told about the model with `use_model` before the loaders are built.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from webdataset.shardlists import expand_urls

from flip.data.caption_fields import caption_sampler
from flip.data.foils import hard_negatives as make_foils
from flip.data.pipeline import EpochSeed, SampleTransform, eval_pipeline, make_loader, train_pipeline
from flip.data.shards import MARKER, PART_FILE, REPORT_NAME, STATS_SUFFIX
from flip.data.skips import DEFAULT_MAX_CONSECUTIVE_SKIPS

if TYPE_CHECKING:  # data sits below models: the model is handed in, never imported
    from flip.models.flip_model import FlipModel


def _is_flip_data_output(folder: str) -> bool:
    """flip-data marks its output folders (`.flip-data`) and writes a `NNNNN_stats.json` with the
    `digest` of its inputs beside each shard; img2dataset's stats files have no such field."""
    if os.path.exists(os.path.join(folder, MARKER)):
        return True
    for path in sorted(glob.glob(os.path.join(folder, f"*{STATS_SUFFIX}")))[:3]:
        try:
            with open(path, encoding="utf-8") as f:
                stats = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(stats, dict) and "digest" in stats:
            return True
    return False


def check_finished_output(folder: str, what: str) -> None:
    """Refuse a flip-data output folder whose run did not finish (no `report.json`).

    flip-data writes `report.json` last; without it the folder holds only the shards finished
    before the run was killed, and the rerun that completes it may still replace some of them.
    A folder written in parts (`--num-parts`) gets it from `flip-data merge-report`, once every
    part has finished.
    """
    if os.path.exists(os.path.join(folder, REPORT_NAME)) or not _is_flip_data_output(folder):
        return
    shards = len(glob.glob(os.path.join(folder, "*.tar")))
    if any(PART_FILE.match(name) for name in os.listdir(folder)):
        raise RuntimeError(
            f"{what}: {folder!r} was written by a flip-data job split into parts (--num-parts) and has no "
            f"{REPORT_NAME} yet ({shards} finished shard(s)): when every part has finished, run "
            f"`flip-data merge-report {folder}`, which checks that none is missing and writes it."
        )
    raise RuntimeError(
        f"{what}: {folder!r} is the output of a flip-data run that did not finish (it has {shards} "
        f"finished shard(s) but no {REPORT_NAME}, which flip-data writes last). Rerun the same flip-data "
        f"command on this folder: it keeps the finished shards and writes the rest. To train on the "
        f"finished shards as they are, list them instead of the folder, e.g. '{folder}/{{00000..00009}}.tar'."
    )


def resolve_shards(spec: str | Sequence[str] | None, what: str) -> list[str]:
    """Shard list from a brace pattern, a folder of `.tar` files (img2dataset output), or a list.

    Local paths are checked here so that a typo fails at start-up with the path in the message,
    not as an empty stream deep inside a loader worker; so is a folder left by a killed
    flip-data run (`check_finished_output`).
    """
    if spec is None:
        return []
    specs = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    urls: list[str] = []
    for item in map(str, specs):
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise FileNotFoundError(f"{what}: folder {item!r} holds no .tar shards")
            check_finished_output(item, what)
            urls.extend(found)
        else:
            urls.extend(expand_urls(item))
    local_missing = [
        u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)
    ]
    if local_missing:
        raise FileNotFoundError(
            f"{what}: {len(local_missing)} shard(s) not found, e.g. {local_missing[0]!r}; give a folder of "
            f".tar files, a brace pattern like 'shards/{{00000..00099}}.tar', or a list of paths"
        )
    if not urls:
        raise ValueError(f"{what}: no shards in {spec!r}")
    return urls


class ShardDataModule(L.LightningDataModule):
    """Training and validation loaders over any (image, caption) shards."""

    def __init__(
        self,
        train_shards: str | Sequence[str] | None = None,
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 1,
        samples_per_epoch: int = 100_000,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        cache_in_memory: bool = False,
        hard_negatives: str | Mapping[str, Any] | None = None,
        captions: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or samples_per_epoch < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(
                f"data: batch_size={batch_size}, samples_per_epoch={samples_per_epoch}, shuffle_buffer="
                f"{shuffle_buffer} must be >= 1 and num_workers={num_workers} >= 0"
            )
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.samples_per_epoch = num_workers, samples_per_epoch
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.max_consecutive_skips = max_consecutive_skips
        self.cache_in_memory = cache_in_memory
        # training captions' foils (`flip.data.foils`); None: off
        self.foils = make_foils(hard_negatives, seed)
        # which of a sample's captions each training step uses (`flip.data.caption_fields`); None: the .txt
        self.captions = caption_sampler(captions, seed)
        self.epoch_seed = EpochSeed()
        self.model: FlipModel | None = None

    def use_model(self, model: FlipModel) -> None:
        self.model = model

    def _transform(self, train: bool) -> SampleTransform:
        if self.model is None:
            raise RuntimeError("call datamodule.use_model(model) before building loaders")
        preprocess = self.model.preprocess_train if train else self.model.preprocess
        return SampleTransform(
            preprocess,
            self.model.tokenizer,
            cache_tokens=train and self.cache_in_memory,
            foils=self.foils if train else None,
            captions=self.captions if train else None,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch_seed.set_epoch(epoch)

    def train_dataloader(self):
        urls = resolve_shards(self.train_shards, "data.train_shards")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        pipeline, num_batches = train_pipeline(
            urls,
            self._transform(train=True),
            batch_size=self.batch_size,
            samples_per_epoch=self.samples_per_epoch,
            world_size=world_size,
            num_workers=self.num_workers,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            epoch_seed=self.epoch_seed,
            max_consecutive_skips=self.max_consecutive_skips,
            cache_in_memory=self.cache_in_memory,
            with_json=any(x is not None and x.needs_json for x in (self.foils, self.captions)),
        )
        return make_loader(pipeline, self.num_workers, num_batches, epoch_seed=self.epoch_seed)

    def val_dataloader(self):
        if self.val_shards is None:
            return []
        urls = resolve_shards(self.val_shards, "data.val_shards")
        trainer = self.trainer
        rank, world_size = (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)
        # on one process every worker needs a shard of its own, or split_by_worker starves it;
        # across ranks every worker reads every shard and keeps its share of the samples
        workers = self.num_workers if world_size > 1 else min(self.num_workers, len(urls))
        pipeline = eval_pipeline(
            urls, self._transform(train=False), self.val_batch_size, rank=rank, world_size=world_size
        )
        return make_loader(pipeline, workers)


class FaceShapesDataModule(ShardDataModule):
    """The embedded procedural dataset: generated on first use under `root`, reused after."""

    def __init__(
        self,
        root: str,
        num_train: int = 20_000,
        num_val: int = 1000,
        num_test: int = 2000,
        samples_per_shard: int = 1000,
        image_size: int = 112,
        generator_seed: int = 0,
        generator_workers: int = 2,
        **loader_kwargs,
    ) -> None:
        given = {k: v for k in ("train_shards", "val_shards") if (v := loader_kwargs.get(k)) is not None}
        if given:
            settings = " ".join(f"data.{k}={v}" for k, v in given.items())
            raise ValueError(
                f"{settings} is set while data is the generated FaceShapes dataset, which makes its own "
                f"shards; to train on shards of your own, add data=shards: python train.py data=shards "
                f"{settings} ..."
            )
        super().__init__(**loader_kwargs)
        self.root = Path(root)
        self.generator_args = {
            "splits": {"train": num_train, "val": num_val, "test": num_test},
            "samples_per_shard": samples_per_shard,
            "image_size": image_size,
            "seed": generator_seed,
        }
        self.generator_workers = generator_workers
        self.manifest = None

    def prepare_data(self) -> None:
        self.ensure()

    def ensure(self):
        """Generate the shards unless the same ones exist already; returns the manifest."""
        from flip.data.faceshapes import ensure_faceshapes

        self.manifest = ensure_faceshapes(
            self.root, num_workers=self.generator_workers, **self.generator_args
        )
        self.train_shards, self.val_shards = self.manifest.urls("train"), self.manifest.urls("val")
        return self.manifest

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is None:  # ranks other than the one that ran prepare_data
            self.ensure()

    def test_urls(self) -> list[str]:
        return (self.manifest or self.ensure()).urls("test")
