"""The shared shard writer: the bytes webdataset's TarWriter wrote, whole or absent, and stable fingerprints.

FaceShapes regenerates its data and flip-data rewrites a shard only when a fingerprint
changes, and both were written by webdataset's `TarWriter` before `flip.data.shards`
existed; a change here would silently regenerate every user's data or mix old and new bytes.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from webdataset import TarWriter

from flip.data.faceshapes.generate import DEFAULT_SPLITS, _params
from flip.data.shards import PAX_MTIME, TAR_MTIME, fingerprint, iter_tar_samples, write_shard
from flip.prepare.writer import ImageRef, Item, JobConfig, _digest

SAMPLES = [
    {"__key__": "b_1", "txt": b"a caption", "jpg": b"\xff\xd8 not decoded here", "json": b'{"x": 1}'},
    {"__key__": "a_0", "jpg": bytearray(b"\x89PNG"), "txt": memoryview(b"caf\xc3\xa9"), "__url__": "ignored"},
]


@pytest.mark.parametrize("mtime", [TAR_MTIME, PAX_MTIME])
def test_write_shard_stores_what_webdatasets_tar_writer_stored(tmp_path: Path, mtime: float) -> None:
    reference = io.BytesIO()
    with TarWriter(reference, encoder=False, mtime=mtime, user="flip", group="flip") as sink:
        for sample in SAMPLES:
            sink.write(sample)
    assert write_shard(tmp_path / "s.tar", iter(SAMPLES), mtime=mtime) == 2
    assert (tmp_path / "s.tar").read_bytes() == reference.getvalue()
    with tarfile.open(tmp_path / "s.tar") as tar:
        assert all(m.mtime == 0 and m.uname == "flip" and m.mode == 0o444 for m in tar.getmembers())
    pax_headers = reference.getvalue().count(b"@PaxHeader")
    assert pax_headers == (5 if isinstance(mtime, float) else 0)  # flip-data's float mtime: one per member
    assert [key for key, _ in iter_tar_samples(str(tmp_path / "s.tar"))] == ["b_1", "a_0"]


def test_a_failed_write_leaves_the_old_shard_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_shard(path, SAMPLES)
    before = path.read_bytes()

    def breaks_midway():
        yield SAMPLES[0]
        raise RuntimeError("the source failed")

    with pytest.raises(RuntimeError, match="the source failed"):
        write_shard(path, breaks_midway())
    with pytest.raises(ValueError, match=r"sample 'k': member 'txt' is str; expected bytes"):
        write_shard(path, [{"__key__": "k", "txt": "not bytes"}])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar"]


def test_fingerprints_are_the_ones_existing_data_was_written_under() -> None:
    # FaceShapes manifests record these: another value would regenerate every user's dataset
    assert fingerprint([_params(DEFAULT_SPLITS, 1000, 112, 0, 90)], length=16) == "f53ce4807596001e"
    demo = {"train": 12000, "val": 1000, "test": 2000}  # conf/data/faceshapes.yaml
    assert fingerprint([_params(demo, 1000, 64, 0, 90)], length=16) == "5bc57a7c880dbfae"
    # flip-data's stats files record these: another value would rewrite every finished shard
    items = [
        Item("a", ImageRef("/x/a.jpg"), "a cap", {"m": 1}, (1.0, 2.0, 3.0, 4.0)),
        Item("b", ImageRef("/t.tar", 5, 6, "b.jpg"), "b"),
    ]
    assert _digest(JobConfig(Path("/tmp/x")).fingerprint(), items) == "e49c280f44efb664e47713d8"
