"""Lightning data modules over (image, caption) webdataset shards.

The model owns its image transforms and tokenizer (they come from open_clip with the towers),
so a data module is told about the model with `use_model` before the loaders are built.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from webdataset.shardlists import expand_urls

from flip.data.pipeline import EpochSeed, SampleTransform, eval_pipeline, make_loader, train_pipeline
from flip.models.flip_model import FlipModel


def resolve_shards(spec: str | Sequence[str] | None, what: str) -> list[str]:
    """Shard list from a brace pattern, a folder of `.tar` files (img2dataset output), or a list.

    Local paths are checked here so that a typo fails at start-up with the path in the message,
    not as an empty stream deep inside a loader worker.
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
        self.epoch_seed = EpochSeed()
        self.model: FlipModel | None = None

    def use_model(self, model: FlipModel) -> None:
        self.model = model

    def _transform(self, train: bool) -> SampleTransform:
        if self.model is None:
            raise RuntimeError("call datamodule.use_model(model) before building loaders")
        preprocess = self.model.preprocess_train if train else self.model.preprocess
        return SampleTransform(preprocess, self.model.tokenizer)

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
        )
        return make_loader(pipeline, self.num_workers, num_batches, epoch_seed=self.epoch_seed)

    def val_dataloader(self):
        if self.val_shards is None:
            return []
        urls = resolve_shards(self.val_shards, "data.val_shards")
        # every worker needs a shard of its own, or split_by_worker starves it
        workers = min(self.num_workers, len(urls))
        return make_loader(eval_pipeline(urls, self._transform(train=False), self.val_batch_size), workers)


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
