"""`data.cache_in_memory`: later passes skip tar reads, JPEG decodes and tokenization, same tensors."""

from __future__ import annotations

import torch

import flip.data.pipeline as pipeline_module
from flip.data.pipeline import EpochSeed, SampleTransform, train_pipeline
from flip.data.shards import decode_sample, iter_tar_samples

from .helpers import write_caption_shards


class Counting:
    """Wraps a function and counts its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def _epochs(urls, transform, cache: bool, epochs: int = 3) -> list[list[torch.Tensor]]:
    epoch_seed = EpochSeed()
    pipeline, _ = train_pipeline(
        urls, transform, batch_size=8, samples_per_epoch=40, world_size=1, num_workers=0,
        shuffle_buffer=16, seed=0, epoch_seed=epoch_seed, cache_in_memory=cache,
    )  # fmt: skip
    batches = []
    for epoch in range(epochs):
        epoch_seed.set_epoch(epoch)
        batches.append([tensor for batch in pipeline for tensor in batch])
    return batches


def test_cached_epochs_give_the_same_tensors_and_read_and_decode_each_sample_once(
    tiny_model, caption_shards, monkeypatch
):
    plain = _epochs(caption_shards, SampleTransform(tiny_model.preprocess_train, tiny_model.tokenizer), False)
    reads, decodes = Counting(iter_tar_samples), Counting(decode_sample)
    monkeypatch.setattr(pipeline_module, "iter_tar_samples", reads)
    monkeypatch.setattr(pipeline_module, "decode_sample", decodes)
    tokenizer = Counting(tiny_model.tokenizer)
    transform = SampleTransform(tiny_model.preprocess_train, tokenizer, cache_tokens=True)
    cached = _epochs(caption_shards, transform, True)

    for epoch_plain, epoch_cached in zip(plain, cached, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(epoch_plain, epoch_cached, strict=True))
    # 4 shards of 10 samples resampled for 3 x 40 samples: each shard read and each sample decoded
    # at most once (without the cache: 12 reads and 120 decodes, see the test below)
    assert reads.calls <= len(caption_shards)
    assert decodes.calls <= 40
    # the captions name one of four colours: one tokenizer call per batch that brought a new one
    assert tokenizer.calls <= 4


def test_a_transform_that_changes_its_input_cannot_change_the_cached_image(tiny_model, caption_shards):
    def paint_black(image):
        image.paste((0, 0, 0), (0, 0, *image.size))  # in place, as no torchvision transform does
        return tiny_model.preprocess(image)

    transform = SampleTransform(paint_black, tiny_model.tokenizer)
    cache = pipeline_module.SampleCache()
    decode = pipeline_module.DecodeSamples(transform, pipeline_module.SkipCounter(), cache=cache)
    url = caption_shards[0]
    raw = [dict(fields, __key__=key, __url__=url) for key, fields in iter_tar_samples(url)]
    list(decode.run(iter(raw)))
    for cached_url, key in cache:
        assert cache.decoded(cached_url, key)["image"].getextrema() != ((0, 0), (0, 0), (0, 0))


def test_without_the_cache_every_pass_reads_and_decodes_again(tiny_model, tmp_path, monkeypatch):
    urls = write_caption_shards(tmp_path / "shards", count=20, per_shard=10)
    reads, decodes = Counting(iter_tar_samples), Counting(decode_sample)
    monkeypatch.setattr(pipeline_module, "iter_tar_samples", reads)
    monkeypatch.setattr(pipeline_module, "decode_sample", decodes)
    _epochs(urls, SampleTransform(tiny_model.preprocess_train, tiny_model.tokenizer), False, epochs=2)
    assert decodes.calls >= 80 and reads.calls >= 8


def test_the_data_config_caches_training_samples_only(tiny_model, caption_shards):
    from flip.data.datamodule import ShardDataModule

    dm = ShardDataModule(caption_shards, caption_shards[:1], batch_size=4, cache_in_memory=True)
    dm.use_model(tiny_model)
    assert dm._transform(train=True).cache_tokens and not dm._transform(train=False).cache_tokens
