import io
import tarfile

import pytest
import torch
import webdataset as wds

from flip.data.datamodule import ShardDataModule, resolve_shards
from flip.data.pipeline import EpochSeed, SampleTransform, eval_pipeline, make_loader, train_pipeline

from .helpers import write_caption_shards


def test_resolve_shards_accepts_folders_patterns_and_lists(tmp_path, caption_shards):
    folder = str(tmp_path / "shards")
    assert resolve_shards(folder, "x") == caption_shards
    assert resolve_shards(f"{folder}/{{00000..00003}}.tar", "x") == caption_shards
    assert resolve_shards(caption_shards[:2], "x") == caption_shards[:2]
    with pytest.raises(FileNotFoundError, match=r"data.train_shards: 2 shard\(s\) not found.*00004.tar"):
        resolve_shards(f"{folder}/{{00000..00005}}.tar", "data.train_shards")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \.tar shards"):
        resolve_shards(str(tmp_path / "empty"), "data.val_shards")


def test_train_pipeline_yields_fixed_size_batches_for_an_epoch_of_samples(tiny_model, caption_shards):
    transform = SampleTransform(tiny_model.preprocess_train, tiny_model.tokenizer)
    pipeline, batches = train_pipeline(
        caption_shards, transform, batch_size=8, samples_per_epoch=50, world_size=1,
        num_workers=0, shuffle_buffer=16, seed=0, epoch_seed=EpochSeed(),
    )  # fmt: skip
    assert batches == 7  # ceil(50 / 8)
    out = list(pipeline)
    assert len(out) == 7
    images, text = out[0]
    assert images.shape == (8, 3, 32, 32) and text.shape == (8, 24)
    # resampling with a fixed seed is reproducible
    again, _ = train_pipeline(
        caption_shards, transform, batch_size=8, samples_per_epoch=50, world_size=1,
        num_workers=0, shuffle_buffer=16, seed=0, epoch_seed=EpochSeed(),
    )  # fmt: skip
    assert all(torch.equal(a[1], b[1]) for a, b in zip(out, list(again), strict=True))


def test_a_new_epoch_draws_a_new_shard_order(tiny_model, caption_shards):
    transform = SampleTransform(tiny_model.preprocess, tiny_model.tokenizer)
    epoch_seed = EpochSeed()
    pipeline, _ = train_pipeline(
        caption_shards, transform, batch_size=10, samples_per_epoch=40, world_size=1,
        num_workers=0, shuffle_buffer=1, seed=0, epoch_seed=epoch_seed,
    )  # fmt: skip
    first = torch.cat([t for _, t in pipeline])
    epoch_seed.set_epoch(1)
    second = torch.cat([t for _, t in pipeline])
    assert not torch.equal(first, second)


def test_eval_pipeline_reads_every_sample_exactly_once_with_two_workers(tiny_model, caption_shards):
    transform = SampleTransform(tiny_model.preprocess, tiny_model.tokenizer)
    loader = make_loader(eval_pipeline(caption_shards, transform, 7, keep_metadata=True), num_workers=2)
    keys = [k for _, _, batch_keys, _ in loader for k in batch_keys]
    assert sorted(keys) == [f"{i:06d}" for i in range(40)]


def _corrupt_shard(path, good: int) -> None:
    """A shard whose middle sample is not a JPEG, followed by a truncated tail."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as sink:
        for i in range(good):
            image = io.BytesIO()
            from PIL import Image

            Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(image, format="JPEG")
            sink.write({"__key__": f"ok{i}", "jpg": image.getvalue(), "txt": f"sample {i}"})
            if i == 1:
                sink.write({"__key__": "broken", "jpg": b"not a jpeg at all", "txt": "broken"})
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        cut = tar.getmembers()[-2].offset_data + 100  # inside the last image
    path.write_bytes(buffer.getvalue()[:cut])


def test_corrupt_samples_and_truncated_shards_are_skipped_not_fatal(tmp_path, tiny_model):
    bad = tmp_path / "bad.tar"
    _corrupt_shard(bad, good=4)
    with tarfile.open(bad) as tar, pytest.raises(tarfile.ReadError):
        tar.getmembers()  # the file really is truncated
    good = write_caption_shards(tmp_path / "good", count=10, per_shard=10)
    transform = SampleTransform(tiny_model.preprocess, tiny_model.tokenizer)
    loader = make_loader(eval_pipeline([str(bad), *good], transform, 4, keep_metadata=True), num_workers=0)
    keys = [k for _, _, batch_keys, _ in loader for k in batch_keys]
    assert "broken" not in keys
    assert {f"{i:06d}" for i in range(10)} <= set(keys)
    assert {"ok0", "ok1", "ok2"} <= set(keys)


def test_datamodule_builds_loaders_with_the_models_transforms(tiny_model, caption_shards):
    dm = ShardDataModule(
        caption_shards, caption_shards[:1], batch_size=4, num_workers=0, samples_per_epoch=20
    )
    with pytest.raises(RuntimeError, match="use_model"):
        dm.train_dataloader()
    dm.use_model(tiny_model)
    loader = dm.train_dataloader()
    assert len(loader) == 5
    images, text = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and text.dtype == torch.long
    assert sum(len(b[0]) for b in dm.val_dataloader()) == 10


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"num_workers": -1}, {"samples_per_epoch": 0}])
def test_datamodule_rejects_bad_sizes_naming_them(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ShardDataModule(["x.tar"], **bad)
