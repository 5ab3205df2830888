"""One list of image extensions: every reader takes an image in each listed format, and none takes another.

The folder source of flip-data, the folder benchmark, flip-query's folder expansion, the
training shard reader and the benchmark shard reader once kept lists of their own; an image
one of them read could be silently ignored by another. These tests hold them all to
`flip.data.shards.IMAGE_EXTENSIONS`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from flip.benchmarks.folder import read_folder
from flip.benchmarks.shards import read_labelled_shards
from flip.cli.query import expand_paths
from flip.data.shards import IMAGE_EXTENSIONS, SampleError, decode_sample, iter_tar_samples
from flip.prepare.report import SkipLog
from flip.prepare.sources.folder import FolderSource

# PIL's name for each format; a listed extension missing here fails the test, so the list
# cannot grow without the readers being shown to read the new format
PIL_FORMATS = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "bmp": "BMP",
    "gif": "GIF",
    "tif": "TIFF",
    "tiff": "TIFF",
}
UNLISTED = ("ppm", "PPM")  # an image format PIL reads, but not one FLIP accepts
SIZE = (12, 9)


def _encode(ext: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", SIZE, (200, 40, 40)).save(buffer, format=PIL_FORMATS.get(ext.lower(), ext.upper()))
    return buffer.getvalue()


def _image_folder(folder: Path) -> dict[str, str]:
    """An image in every accepted format (one in upper case) and one unaccepted: file name -> extension."""
    folder.mkdir(parents=True)
    names = {f"img_{ext}.{ext}": ext for ext in IMAGE_EXTENSIONS}
    names["upper_png.PNG"] = "png"
    for name, ext in names.items():
        (folder / name).write_bytes(_encode(ext))
    (folder / "other.ppm").write_bytes(_encode("ppm"))
    return names


def test_every_listed_extension_has_a_test_format() -> None:
    assert set(IMAGE_EXTENSIONS) == set(PIL_FORMATS)


def test_flip_data_folder_source_finds_exactly_the_listed_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    names = _image_folder(images)
    table = tmp_path / "captions.csv"
    table.write_text("file_name,caption\nimg_jpg.jpg,a listed image\n")
    skips = SkipLog()
    items = list(FolderSource(images, table).items(skips))
    assert [item.image.path for item in items] == [str(images / "img_jpg.jpg")]
    unlisted = {example["sample"] for example in skips.examples["missing_caption"]}
    assert unlisted == set(names) - {"img_jpg.jpg"}  # every other accepted image is found, .ppm is not
    assert skips.counts == {"missing_caption": len(names) - 1}


def test_folder_benchmark_and_flip_query_read_exactly_the_listed_images(tmp_path: Path) -> None:
    names = _image_folder(tmp_path / "bench" / "red")
    split = read_folder(tmp_path / "bench", "test")
    assert sorted(split.keys) == sorted(f"red/{name}" for name in names)
    assert all(split.images.load(i).size == SIZE for i in range(len(split)))
    found = expand_paths([str(tmp_path / "bench")])
    assert sorted(Path(p).name for p in found) == sorted(names)


@pytest.fixture
def shard(tmp_path: Path) -> tuple[str, list[str]]:
    """One sample per accepted image member (plus one upper-case), and one with a .ppm image only."""
    keys = []
    path = tmp_path / "formats.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for ext in (*IMAGE_EXTENSIONS, "PNG"):
            key = f"sample_{ext}"
            keys.append(key)
            labels = json.dumps({"red": True}).encode()
            sink.write({"__key__": key, ext: _encode(ext), "txt": f"a {ext} image".encode(), "json": labels})
        sink.write({"__key__": "sample_ppm", "ppm": _encode("ppm"), "txt": b"a ppm image", "json": labels})
    return str(path), keys


def test_training_shard_reader_decodes_exactly_the_listed_image_members(shard) -> None:
    url, keys = shard
    decoded, refused = [], []
    for key, fields in iter_tar_samples(url):
        try:
            sample = decode_sample(fields)
        except SampleError as exc:
            refused.append((key, exc.reason))
            continue
        assert sample["image"].size == SIZE and sample["text"].startswith("a ")
        decoded.append(key)
    assert decoded == keys
    assert refused == [("sample_ppm", "missing_field")]  # the .ppm member is never read


def test_benchmark_shard_reader_reads_exactly_the_listed_image_members(shard) -> None:
    url, keys = shard
    split = read_labelled_shards([url], "test", ["red"])
    assert split.keys == keys and split.skipped == 1
    assert all(split.images.load(i).size == SIZE for i in range(len(split)))
