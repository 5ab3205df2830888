"""No shard reader runs code from a shard, and a shard list with nothing usable stops with a clear error.

Every sample of the EVIL shard carries, beside its image, caption and `.json`, one member for
every extension webdataset's default decoder (webdataset 1.0.2, autodecode.py) maps to a
loader, and a few more: each holds a pickle whose `__reduce__` creates a marker file. The
payloads are live (`test_the_payloads_run_under_webdatasets_default_decoder`); no FLIP reader
may create a marker, and every reader must still deliver the good samples.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import pathlib
import pickle
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from flip.benchmarks.shards import read_faceshapes, read_labelled_shards
from flip.data.pipeline import EpochSeed, SampleTransform, eval_pipeline, make_loader, train_pipeline
from flip.prepare.sources.facecaption import index_tar

from .helpers import (
    ROOT,
    SHARDS_BASE,
    flip_data_command,
    flip_data_env,
    flip_root_env,
    jpeg_bytes,
    run_train_py,
    write_caption_shards,
)

# pickle.loads (pkl, pickle, pyd), torch.load (pth), numpy (npy, npz), msgpack (mp, msg),
# tenbin (ten, tb), cbor, int() (cls, cls2, index, inx, id), json (jsn) and the same behind
# gzip (webdataset's gzfilter decompresses `.gz` and decodes what is inside); `.pt` and
# `.msgpack` are the names such files also go by
EVIL_EXTS = [
    "pyd", "pickle", "pkl", "pth", "pt", "npy", "npz", "mp", "msg", "msgpack", "ten", "tb", "cbor",
    "cls", "cls2", "index", "inx", "id", "jsn", "pyd.gz", "pickle.gz", "pth.gz", "seg.pyd",
]  # fmt: skip
LIVE_UNDER_WEBDATASET = ["pyd", "pickle", "pkl", "pth", "pyd.gz", "pickle.gz", "pth.gz", "seg.pyd"]


class _Touch:
    """Unpickling it creates `path`: the stand-in for any code a crafted file could run."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def _payload(ext: str, markers: pathlib.Path) -> bytes:
    evil = _Touch(markers / f"ran-{ext}")
    base = ext.split(".")[-2] if ext.endswith(".gz") else ext.split(".")[-1]
    buffer = io.BytesIO()
    if base == "pth":
        torch.save(evil, buffer)
        data = buffer.getvalue()
    elif base == "npy":
        np.save(buffer, np.array([evil], dtype=object), allow_pickle=True)
        data = buffer.getvalue()
    elif base == "npz":
        np.savez(buffer, a=np.array([evil], dtype=object))
        data = buffer.getvalue()
    else:
        data = pickle.dumps(evil)
    return gzip.compress(data) if ext.endswith(".gz") else data


def write_evil_shard(path: pathlib.Path, markers: pathlib.Path, exts: list[str] = EVIL_EXTS) -> pathlib.Path:
    """One img2dataset-like sample (jpg, txt, json with url and sizes) per extension, carrying that
    extension's payload (one per sample: a decoder that fails on one member drops the whole
    sample before the others are decoded), then a sample of payloads only."""
    markers.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i, ext in enumerate(exts):
            meta = {"url": f"http://evil/{i}.jpg", "width": 40, "height": 40, "red": True}
            sample = {
                "__key__": f"{i:06d}",
                "jpg": jpeg_bytes((200, 30 * i % 255, 30)),
                "txt": f"a face number {i}".encode(),
                "json": json.dumps(meta).encode(),
                ext: _payload(ext, markers),
            }
            sink.write(sample)
        sink.write({"__key__": "payloads", **{ext: _payload(ext, markers) for ext in exts}})
    return path


N = len(EVIL_EXTS)


@pytest.fixture
def evil(tmp_path) -> tuple[str, pathlib.Path]:
    markers = tmp_path / "markers"
    return str(write_evil_shard(tmp_path / "evil" / "00000.tar", markers)), markers


def _ran(markers: pathlib.Path) -> list[str]:
    return sorted(p.name for p in markers.iterdir())


def test_the_payloads_run_under_webdatasets_default_decoder(evil):
    """The harness is real: webdataset's own default decoder runs the payloads."""
    url, markers = evil
    from webdataset.autodecode import default_decoder

    for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
        for ext in set(LIVE_UNDER_WEBDATASET) & set(sample):
            with contextlib.suppress(Exception):
                default_decoder({"__key__": sample["__key__"], ext: sample[ext]})
    assert _ran(markers) == sorted(f"ran-{e}" for e in LIVE_UNDER_WEBDATASET)


def _eval_keys(url, tiny_model, keep_metadata, **share):
    transform = SampleTransform(tiny_model.preprocess, tiny_model.tokenizer)
    loader = make_loader(eval_pipeline([url], transform, 3, keep_metadata=keep_metadata, **share), 0)
    batches = list(loader)
    if keep_metadata:
        assert all(meta["red"] for *_, metas in batches for meta in metas)  # .json decoded as JSON
        return [k for _, _, keys, _ in batches for k in keys]
    return [len(b[0]) for b in batches]


@pytest.mark.parametrize("keep_metadata", [True, False], ids=["with-metadata", "without-metadata"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_eval_pipeline_decodes_no_payload(evil, tiny_model, keep_metadata, world_size):
    url, markers = evil
    share = {"rank": 0, "world_size": world_size} if world_size > 1 else {}
    got = _eval_keys(url, tiny_model, keep_metadata, **share)
    assert _ran(markers) == []
    if world_size == 1:
        assert got == [f"{i:06d}" for i in range(N)] if keep_metadata else sum(got) == N
    else:  # rank 0's equal share: every other sample (the payload-only one has no member to count)
        assert got == [f"{i:06d}" for i in range(0, N // 2 * 2, 2)] if keep_metadata else sum(got) == N // 2


def test_train_pipeline_decodes_no_payload(evil, tiny_model):
    url, markers = evil
    pipeline, batches = train_pipeline(
        [url], SampleTransform(tiny_model.preprocess_train, tiny_model.tokenizer), batch_size=4,
        samples_per_epoch=24, world_size=1, num_workers=0, shuffle_buffer=8, seed=0, epoch_seed=EpochSeed(),
    )  # fmt: skip
    seen = [b[0].shape[0] for b in make_loader(pipeline, 0, batches)]
    assert seen == [4] * 6
    assert _ran(markers) == []


def test_labelled_shard_readers_decode_no_payload(evil, tmp_path):
    url, markers = evil
    split = read_labelled_shards([url], "test", ["red"])
    assert split.keys == [f"{i:06d}" for i in range(N)] and split.captions[1] == "a face number 1"
    # the FaceShapes reader, on a manifest naming the evil shard
    root = pathlib.Path(url).parent
    manifest = {
        "version": 4,
        "fingerprint": "x",
        "params": {},
        "splits": {"test": N},
        "shards": {"test": ["00000.tar"]},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    faceshapes = read_faceshapes(root, "test", attributes=["red"], questions={})
    assert faceshapes.keys == split.keys
    assert _ran(markers) == []


def test_facecaption_download_index_decodes_no_payload(evil):
    url, markers = evil
    index, problem = index_tar(url)
    assert problem is None and sorted(index) == sorted(f"http://evil/{i}.jpg" for i in range(N))
    with open(url, "rb") as f:
        f.seek(index["http://evil/3.jpg"].offset)
        Image.open(io.BytesIO(f.read(index["http://evil/3.jpg"].size))).load()
    assert _ran(markers) == []


def test_benchmark_baseline_loader_decodes_no_payload(tmp_path, tiny_model):
    """bench/loader_throughput.py's open_clip baseline decodes with webdataset's default handlers.

    Only the payloads it would run: a member it fails on (`.cls` holding a pickle) would make it
    skip every sample and resample forever."""
    markers = tmp_path / "markers"
    url = str(write_evil_shard(tmp_path / "evil.tar", markers, exts=LIVE_UNDER_WEBDATASET))
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import loader_throughput
    finally:
        sys.path.remove(str(ROOT / "bench"))
    args = Namespace(shuffle_buffer=4, batch_size=4, samples_per_round=8, workers=0)
    loader = loader_throughput.open_clip_loader(
        [url], tiny_model.preprocess_train, tiny_model.tokenizer, args
    )
    images, _ = next(iter(loader))
    assert images.shape[0] == 4
    assert _ran(markers) == []


@pytest.mark.slow
def test_train_py_with_evil_validation_shards_runs_no_payload(evil, tmp_path):
    """The issue's command: validation on a crafted shard."""
    url, markers = evil
    good = write_caption_shards(tmp_path / "good", count=16, per_shard=8)
    run_train_py(
        *SHARDS_BASE,
        f"data.train_shards=[{','.join(good)}]",
        f"data.val_shards=[{url}]",
        "data.batch_size=4", "data.num_workers=0", "data.samples_per_epoch=8", "data.shuffle_buffer=8",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null",
        f"hydra.run.dir={tmp_path / 'run'}",
        flip_root=tmp_path,
    )  # fmt: skip
    assert _ran(markers) == []
    metrics = (next((tmp_path / "run" / "csv").glob("version_*/metrics.csv"))).read_text()
    assert "val/loss" in metrics  # validation ran, on the good samples of the evil shard


# -- shard lists with nothing usable -------------------------------------------------------------


def _train_py_expecting_failure(tmp_path, *overrides: str, timeout: int = 120) -> tuple[str, str]:
    """`python train.py` that must stop by itself, non-zero, within `timeout` seconds."""
    env = flip_root_env(tmp_path)
    done = subprocess.run(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode != 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def _garbage(tmp_path, kind: str) -> pathlib.Path:
    path = tmp_path / "garbage.tar"
    if kind == "not-a-tar":
        path.write_bytes(b"<html>404 not found</html>\n" * 100)
    else:  # a real tar whose every caption is invalid UTF-8
        with wds.TarWriter(str(path), encoder=False) as sink:
            for i in range(20):
                sink.write({"__key__": f"{i:04d}", "jpg": jpeg_bytes((10, 10, 10)), "txt": b"caf\xe9 \xff"})
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "reason"), [("not-a-tar", "not_a_tar"), ("bad-captions", "non_utf8_caption")]
)
def test_a_shard_list_with_no_usable_sample_stops_with_a_clear_error(tmp_path, kind, reason):
    garbage = _garbage(tmp_path, kind)
    stdout, stderr = _train_py_expecting_failure(
        tmp_path, *SHARDS_BASE, f"data.train_shards=[{garbage}]", "data.batch_size=4",
        "data.num_workers=0", "data.samples_per_epoch=16", "data.shuffle_buffer=8",
    )  # fmt: skip
    assert "no usable (image, caption) samples" in stderr
    assert str(garbage) in stderr and f"{reason} " in stderr
    log = stdout + stderr
    assert len(log) < 100_000 and log.count("skipped") < 40, log[-3000:]


def test_repeated_skips_are_summarised_not_logged_one_by_one(tmp_path, tiny_model, caplog):
    """Many bad samples among good ones: the run goes on, and the log grows as the log of the skips."""
    path = tmp_path / "mixed.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(400):
            text = f"sample {i}".encode() if i % 100 == 0 else b"\xff\xfe"
            sink.write({"__key__": f"{i:04d}", "jpg": jpeg_bytes((i % 255, 0, 0)), "txt": text})
    pipeline, batches = train_pipeline(
        [str(path)], SampleTransform(tiny_model.preprocess_train, tiny_model.tokenizer), batch_size=2,
        samples_per_epoch=8, world_size=1, num_workers=0, shuffle_buffer=4, seed=0, epoch_seed=EpochSeed(),
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        assert [len(b[0]) for b in make_loader(pipeline, 0, batches)] == [2, 2, 2, 2]
    messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert 5 <= len(messages) < 20  # ~800 skips
    assert "further non_utf8_caption skips are summarised" in messages[4]
    assert any(m.startswith("skipped ") and "non_utf8_caption" in m for m in messages[5:])


def test_skip_counter_stops_after_max_consecutive_skips_and_a_usable_sample_resets_the_count():
    from flip.data.pipeline import NoUsableSamples, SkipCounter

    counter = SkipCounter(["a.tar", "b.tar"], max_consecutive=5)
    for _ in range(4):
        counter(ValueError("bad"), "k", "a.tar")
    counter.usable("b.tar")
    for _ in range(4):
        counter(ValueError("bad"), "k", "a.tar")
    stop = r"last 5 samples or shards in a row.*a\.tar, b\.tar.*ValueError 9"
    with pytest.raises(NoUsableSamples, match=stop):
        counter(ValueError("bad"), "k", "a.tar")
    # a shard read through with nothing usable does not stop the stream while another shard works
    counter = SkipCounter(["a.tar", "b.tar"], max_consecutive=None)
    counter.usable("b.tar")
    counter(ValueError("bad"), "k", "a.tar")
    counter.shard_read("a.tar", 1)
    counter.shard_read("b.tar", 1)


# -- weak messages ---------------------------------------------------------------------------------


def test_a_non_tar_shard_is_counted_as_not_a_tar_not_truncated(tmp_path, tiny_model, caplog):
    garbage = _garbage(tmp_path, "not-a-tar")
    good = write_caption_shards(tmp_path / "good", count=6, per_shard=6)
    transform = SampleTransform(tiny_model.preprocess, tiny_model.tokenizer)
    with caplog.at_level("WARNING"):
        keys = [
            k
            for _, _, ks, _ in make_loader(eval_pipeline([str(garbage), *good], transform, 4, True), 0)
            for k in ks
        ]
    assert len(keys) == 6
    assert f"{garbage}: not_a_tar (" in caplog.text and "truncated" not in caplog.text
    assert index_tar(str(garbage)) == ({}, "not_a_tar")


def _flip_data_folder(tmp_path) -> pathlib.Path:
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (48, 48), (40 * i, 90, 90)).save(images / f"{i}.jpg")
        rows.append(f"{i}.jpg,a face number {i}")
    (tmp_path / "captions.csv").write_text("file_name,caption\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    done = subprocess.run(
        flip_data_command("folder", str(images), "--captions", str(tmp_path / "captions.csv"), "--output",
                          str(out), "--samples-per-shard", "3", "--workers", "1", "--no-progress"),
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=flip_data_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.slow
def test_a_flip_data_folder_without_its_report_is_refused_with_how_to_resume(tmp_path):
    from flip.data.datamodule import resolve_shards

    out = _flip_data_folder(tmp_path)
    assert len(resolve_shards(str(out), "data.train_shards")) == 2  # finished: trains
    (out / "report.json").unlink()  # as a killed run leaves it
    with pytest.raises(RuntimeError, match=r"did not finish.*report\.json.*Rerun the same flip-data command"):
        resolve_shards(str(out), "data.train_shards")
    # img2dataset's own *_stats.json files do not make a folder look like flip-data's
    plain = tmp_path / "img2dataset"
    write_caption_shards(plain, count=4, per_shard=4)
    (plain / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 4, "status_dict": {}}))
    assert len(resolve_shards(str(plain), "data.train_shards")) == 1


@pytest.mark.slow
def test_train_shards_without_data_shards_says_to_add_it(tmp_path):
    _, stderr = _train_py_expecting_failure(tmp_path, "data.train_shards=[x.tar]", timeout=120)
    assert "add data=shards" in stderr and "data.train_shards=['x.tar']" in stderr
    assert "not in struct" not in stderr
