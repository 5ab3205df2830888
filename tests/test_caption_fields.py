"""Several captions per face (`data.captions`, flip.data.caption_fields): which caption a step trains
on, drawn per sample from its stream seed; and today's single-caption stream left byte for byte."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
import webdataset as wds
from hydra.utils import instantiate

from flip.data.caption_fields import CaptionSampler, caption_sampler, split_sentences
from flip.data.datamodule import ShardDataModule
from flip.data.foils import stable_seed
from flip.data.pipeline import DecodeSamples, EpochSeed, SampleTransform, make_loader, train_pipeline
from flip.data.shards import SampleError
from flip.data.skips import SkipCounter

from .helpers import SHARDS_BASE, compose_train_config, jpeg_bytes

N = 4000


def _within_binomial(count: int, n: int, p: float, sds: float = 4.0) -> bool:
    """`count` successes of `n` draws agree with probability `p` (within `sds` binomial sd)."""
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def _draws(sampler: CaptionSampler, sample: dict, n: int = N) -> Counter:
    return Counter(sampler({**sample, "__seed__": stable_seed("test", i)}) for i in range(n))


FACE = {"text": "a face caption", "json": {"caption": "a face caption", "laion_caption": "laion text"}}


def test_fields_are_drawn_with_their_probabilities():
    sampler = caption_sampler({"fields": {"caption": 0.7, "laion_caption": 0.3}}, seed=1)
    drawn = _draws(sampler, FACE)
    assert set(drawn) == {"a face caption", "laion text"}
    assert _within_binomial(drawn["a face caption"], N, 0.7), drawn
    # relative weights: 7 and 3 draw as 0.7 and 0.3 do
    again = _draws(caption_sampler({"fields": {"caption": 7, "laion_caption": 3}}, seed=1), FACE)
    assert again == drawn


def test_a_txt_of_several_lines_and_a_json_list_are_several_captions():
    lines = {"text": "one\n\ntwo \nthree\n"}
    drawn = _draws(caption_sampler({"fields": {"txt": 1.0}}), lines, n=3000)
    assert set(drawn) == {"one", "two", "three"}
    assert all(_within_binomial(c, 3000, 1 / 3) for c in drawn.values()), drawn
    ten = {"text": "x", "json": {"captions": [f"caption {i}" for i in range(10)]}}
    drawn = _draws(caption_sampler({"fields": {"captions": 1.0}}), ten)
    assert set(drawn) == {f"caption {i}" for i in range(10)}
    assert all(_within_binomial(c, N, 0.1) for c in drawn.values()), drawn


def test_a_missing_field_falls_back_to_the_others_by_their_probabilities():
    sampler = caption_sampler({"fields": {"laion_caption": 0.7, "caption": 0.2, "txt": 0.1}})
    no_laion = {"text": "the txt", "json": {"caption": "the json caption"}}
    drawn = _draws(sampler, no_laion)
    assert set(drawn) == {"the txt", "the json caption"}
    assert _within_binomial(drawn["the json caption"], N, 2 / 3), drawn  # 0.2 : 0.1
    empty = {"text": "the txt", "json": {"caption": "  ", "laion_caption": []}}
    assert set(_draws(sampler, empty, n=50)) == {"the txt"}  # empty values count as missing
    with pytest.raises(
        SampleError, match=r"none of the caption fields \['laion_caption'\].*\['caption'\]"
    ) as err:
        caption_sampler({"fields": {"laion_caption": 1.0}})({**no_laion, "__seed__": 1})
    assert err.value.reason == "missing_caption"


def test_the_draw_is_seeded_per_sample():
    sampler = caption_sampler({"fields": {"caption": 0.5, "laion_caption": 0.5}, "sentences": None}, seed=3)
    sample = {**FACE, "__seed__": 12345}
    assert len({sampler(sample) for _ in range(20)}) == 1  # the same place in the stream: the same caption
    other = caption_sampler({"fields": {"caption": 0.5, "laion_caption": 0.5}}, seed=4)
    mine, theirs = ([s({**FACE, "__seed__": i}) for i in range(200)] for s in (sampler, other))
    assert mine != theirs  # the data seed changes the draws
    # evaluation samples have no stream seed: seeded by key and caption instead
    assert sampler({**FACE, "__key__": "k"}) == sampler({**FACE, "__key__": "k"})


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("A young woman. She smiles.", ["A young woman.", "She smiles."]),
        (
            "Mr. Smith wears glasses! Is he 1.85 m tall? Yes.",
            ["Mr. Smith wears glasses!", "Is he 1.85 m tall?", "Yes."],
        ),
        ("Dr. J. Doe, e.g. a doctor, has a beard.", ["Dr. J. Doe, e.g. a doctor, has a beard."]),
        ('He said "hello." Then left.', ['He said "hello."', "Then left."]),
        ("first line\nsecond line. third", ["first line", "second line.", "third"]),
        ("no full stop", ["no full stop"]),
        ("   ", []),
    ],
)
def test_sentences_split_on_end_punctuation_but_not_abbreviations_initials_or_decimals(text, sentences):
    assert split_sentences(text) == sentences


def test_one_sentence_per_step_draws_every_sentence():
    sample = {"text": "A woman with long hair. She wears earrings. She is smiling.", "json": {}}
    drawn = _draws(caption_sampler({"fields": {"txt": 1.0}, "sentences": "one"}), sample, n=3000)
    assert set(drawn) == {"A woman with long hair.", "She wears earrings.", "She is smiling."}
    assert all(_within_binomial(c, 3000, 1 / 3) for c in drawn.values()), drawn


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("caption", r"data.captions='caption'; accepted: null .* or a mapping"),
        ({"field": {"caption": 1}}, r"unknown key\(s\) \['field'\]; accepted: fields, sentences"),
        ({"fields": {}}, r"data.captions.fields=\{\}; accepted: a mapping"),
        ({"fields": {"caption": -1}}, r"data.captions.fields.caption=-1; accepted: a probability >= 0"),
        ({"fields": {"caption": 0}}, r"at least one probability must be > 0"),
        (
            {"sentences": "all"},
            r"sentences='all'; accepted: null .* or 'one'.*several positives per image are not built",
        ),
    ],
)
def test_bad_settings_fail_naming_what_is_accepted(config, message):
    with pytest.raises(ValueError, match=message):
        caption_sampler(config)


def _raw(key: str, txt: str, record: dict | None) -> dict:
    raw = {"__key__": key, "__url__": "shard.tar", "jpg": jpeg_bytes((200, 30, 30)), "txt": txt.encode()}
    if record is not None:
        raw["json"] = json.dumps(record).encode()
    return raw


def test_a_sample_with_no_caption_in_its_fields_is_skipped_and_counted(tiny_model):
    sampler = caption_sampler({"fields": {"laion_caption": 1.0}})
    transform = SampleTransform(tiny_model.preprocess_train, tiny_model.tokenizer, captions=sampler)
    skips = SkipCounter(max_consecutive=None)
    raws = [
        _raw("a", "face a", {"laion_caption": "laion a"}),
        _raw("b", "face b", {"caption": "face b"}),
        _raw("c", "face c", None),
        _raw("d", "face d", {"laion_caption": ["laion d"]}),
    ]
    out = list(DecodeSamples(transform.prepare, skips, with_json=True).run(raws))
    assert [caption for _, caption in out] == ["laion a", "laion d"]
    assert skips.by_reason == {"missing_caption": 2}


def _write_faces(directory, count: int = 60, per_shard: int = 15) -> list[str]:
    """Shards as flip-data writes FaceCaption-15M: the face caption in the .txt and the .json, the
    LAION caption in the .json (missing for every fifth face)."""
    directory.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard in range(count // per_shard):
        path = directory / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                face = f"Face {i} has red hair. Face {i} smiles."
                record = {"caption": face, **({"laion_caption": f"photo {i}"} if i % 5 else {})}
                colour = (10 * (i % 20), 30, 200 - 5 * (i % 20))
                sample = {"__key__": f"{i:06d}", "jpg": jpeg_bytes(colour), "txt": face}
                sink.write({**sample, "json": json.dumps(record)})
        urls.append(str(path))
    return urls


@pytest.mark.parametrize("workers", [0, 2])
def test_the_stream_resumes_with_the_same_captions(tmp_path, tiny_model, workers):
    urls = _write_faces(tmp_path / "faces")
    sampler = caption_sampler({"fields": {"caption": 0.5, "laion_caption": 0.5}, "sentences": "one"}, seed=7)

    def loader():
        transform = SampleTransform(tiny_model.preprocess_train, tiny_model.tokenizer, captions=sampler)
        epoch_seed = EpochSeed()
        pipeline, batches = train_pipeline(
            urls, transform, batch_size=4, samples_per_epoch=400, world_size=1, num_workers=workers,
            shuffle_buffer=8, seed=7, epoch_seed=epoch_seed, with_json=True,
        )  # fmt: skip
        return make_loader(pipeline, workers, batches, epoch_seed=epoch_seed)

    whole = [batch for _, batch in zip(range(8), loader(), strict=False)]
    first = loader()
    for _, _batch in zip(range(5), first, strict=False):
        pass
    state = first.state_dict()
    again = loader()
    again.load_state_dict(state)
    rest = [batch for _, batch in zip(range(3), again, strict=False)]
    for expected, got in zip(whole[5:], rest, strict=True):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # both fields and single sentences were drawn: the token rows differ from the whole .txt's
    whole_txt = tiny_model.tokenizer(["Face 0 has red hair. Face 0 smiles."])[0]
    lengths = {int((row != 0).sum()) for batch in whole for row in batch[1]}
    assert len(lengths) > 1 and int((whole_txt != 0).sum()) not in lengths


def _batches(transform: SampleTransform, urls: list[str], n: int = 6) -> list[list[torch.Tensor]]:
    pipeline, _ = train_pipeline(
        urls, transform, batch_size=5, samples_per_epoch=200, world_size=1, num_workers=0,
        shuffle_buffer=8, seed=3, epoch_seed=EpochSeed(), with_json=True,
    )  # fmt: skip
    return [batch for _, batch in zip(range(n), pipeline, strict=False)]


def test_the_default_leaves_the_stream_byte_for_byte_as_before(tmp_path, tiny_model):
    urls = _write_faces(tmp_path / "faces")
    # main's transform, built as before data.captions existed
    before = _batches(SampleTransform(tiny_model.preprocess_train, tiny_model.tokenizer), urls)
    # the data module as train.py builds it from conf/data/shards.yaml (data.captions: null)
    cfg = compose_train_config(tmp_path, [f"data.train_shards={tmp_path / 'faces'}"], SHARDS_BASE)
    assert cfg.data.captions is None
    module = instantiate(cfg.data)
    assert isinstance(module, ShardDataModule) and module.captions is None
    module.use_model(tiny_model)
    now = _batches(module._transform(train=True), urls)
    # and {txt: 1} on one-line captions draws the .txt itself
    only_txt = SampleTransform(
        tiny_model.preprocess_train, tiny_model.tokenizer, captions=caption_sampler({"fields": {"txt": 1}})
    )
    for batches in (now, _batches(only_txt, urls)):
        for mine, theirs in zip(batches, before, strict=True):
            assert len(mine) == len(theirs) == 2
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


@pytest.mark.slow
def test_a_resumed_run_trains_on_the_captions_of_the_run_it_continues(tmp_path):
    from flip.training.run import train

    from .helpers import csv_losses
    from .test_resume import Interrupted, _shard_overrides

    _write_faces(tmp_path / "faces", count=120, per_shard=20)
    mix = "data.captions={fields:{caption:0.5,laion_caption:0.5},sentences:one}"
    overrides = [*_shard_overrides(tmp_path / "faces", 0), mix]
    train(compose_train_config(tmp_path / "whole", overrides, SHARDS_BASE))
    whole = csv_losses(tmp_path / "whole" / "run")
    crash = "+callbacks.crash={_target_: tests.test_resume.InterruptAt, step: 3}"
    with pytest.raises(Interrupted):
        train(compose_train_config(tmp_path / "split", [*overrides, crash], SHARDS_BASE))
    last = tmp_path / "split" / "run" / "checkpoints" / "last.ckpt"
    train(compose_train_config(tmp_path / "split", [*overrides, f"ckpt_path={last}"], SHARDS_BASE))
    resumed = csv_losses(tmp_path / "split" / "run", 1)
    assert sorted(resumed) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed[step] == pytest.approx(whole[step], rel=0, abs=1e-6), (step, resumed, whole)
