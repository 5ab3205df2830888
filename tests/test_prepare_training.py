"""img2dataset output trains as it is, and bad samples met while training are skipped and logged by reason."""

from __future__ import annotations

import csv
import io
import logging
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from flip.data.pipeline import SampleTransform, SkipCounter, eval_pipeline, make_loader

from .helpers import COLOURS, TINY_OVERRIDES, run_train_py, write_img2dataset


def _samples(shard: int, count: int) -> list[dict]:
    names = sorted(COLOURS)
    return [
        {
            "url": f"http://img/{shard}/{i}.jpg",
            "caption": f"a {names[i % 3]} square",
            "image": Image.new("RGB", (40, 40), COLOURS[names[i % 3]]),
        }
        for i in range(count)
    ]


@pytest.mark.slow
def test_img2dataset_output_trains_as_is_through_train_py(tmp_path):
    folder = tmp_path / "laion-face"
    write_img2dataset(folder, [_samples(0, 12), _samples(1, 12)])
    assert sorted(p.name for p in folder.iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "00001.parquet",
        "00001.tar",
        "00001_stats.json",
    ]
    model = [o for o in TINY_OVERRIDES if o.startswith(("model.", "trainer.", "optim.", "callbacks."))]
    overrides = [
        # on top of the default experiment (the FaceShapes demo), as a user would type it
        "data=shards",
        f"data.train_shards={folder}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.samples_per_epoch=24",
        "data.shuffle_buffer=16",
        "evaluate=false",
        *[o for o in model if not o.startswith(("trainer.max_steps", "trainer.val_check", "~"))],
        "trainer.max_steps=3",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    run_train_py(*overrides, flip_root=tmp_path)
    with open(next((tmp_path / "run" / "csv").glob("version_*/metrics.csv"))) as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps == [0, 1, 2]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_bad_samples_met_while_training_are_skipped_and_logged_by_reason(tmp_path, tiny_model, caplog):
    folder = tmp_path / "shards"
    tars = write_img2dataset(folder, [_samples(0, 4), _samples(1, 4), _samples(2, 4)])
    good = io.BytesIO()
    Image.new("RGB", (16, 16)).save(good, format="JPEG")
    with wds.TarWriter(str(folder / "00003.tar")) as sink:
        sink.write({"__key__": "corrupt", "jpg": b"\xff\xd8 this is no jpeg", "txt": "a corrupt image"})
        sink.write({"__key__": "latin1", "jpg": good.getvalue(), "txt": b"caf\xe9"})
        sink.write({"__key__": "nocaption", "jpg": good.getvalue()})
        sink.write({"__key__": "fine", "jpg": good.getvalue(), "txt": "a black square"})
    with tarfile.open(tars[2]) as tar:
        cut = tar.getmember("000020002.jpg").offset_data + 40
    tars[2].write_bytes(tars[2].read_bytes()[:cut])  # a shard truncated inside its third image

    transform = SampleTransform(tiny_model.preprocess, tiny_model.tokenizer)
    urls = [*(str(t) for t in tars), str(folder / "00003.tar")]
    with caplog.at_level(logging.WARNING, logger="flip.data.pipeline"):
        loader = make_loader(eval_pipeline(urls, transform, 4, keep_metadata=True), num_workers=0)
        keys = [k for _, _, batch, _ in loader for k in batch]
    expected = {f"{s:05d}{i:04d}" for s in (0, 1) for i in range(4)} | {"000020000", "000020001", "fine"}
    assert set(keys) == expected and len(keys) == len(expected)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for reason in ("corrupt_image", "non_utf8_caption", "missing_field", "truncated_tar"):
        assert f": {reason} (" in logged, reason
    assert "'corrupt' in " in logged  # the key and shard of a bad sample are named


def test_skip_counter_names_reasons_for_each_kind_of_failure():
    from webdataset.autodecode import DecodingError

    counter = SkipCounter()
    failures = [
        tarfile.ReadError("unexpected end of data"),
        ValueError("Cannot find ['txt', 'text'] in sample keys"),
        RuntimeError("something else"),
    ]
    for cause in (Image.DecompressionBombError("too big"), UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "bad")):
        wrapped = DecodingError(url="x.tar", key="k", k="jpg")
        wrapped.__cause__ = cause
        failures.append(wrapped)
    assert all(counter(f) for f in failures)  # True: skip and go on
    assert counter.skipped == 5
    assert dict(counter.by_reason) == {
        "truncated_tar": 1,
        "missing_field": 1,
        "RuntimeError": 1,
        "decompression_bomb": 1,
        "non_utf8_caption": 1,
    }
