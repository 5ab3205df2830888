"""`flip-data facecaption15m`: parquet rows matched to img2dataset downloads by url, faces cropped by box."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from flip.cli.data import main
from flip.prepare.hygiene import HygieneConfig, SkipSample
from flip.prepare.sources.facecaption import Download, FaceCaptionSource, map_box, parse_box
from flip.prepare.writer import JobConfig, run_job

from .helpers import read_shards, write_img2dataset

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def _scene(size: tuple[int, int], boxes: list[tuple[tuple[int, int, int, int], tuple]]) -> Image.Image:
    image = Image.new("RGB", size, BLUE)
    draw = ImageDraw.Draw(image)
    for (x0, y0, x1, y1), colour in boxes:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    return image


@pytest.fixture
def facecaption(tmp_path) -> tuple[Path, Path]:
    """Downloads in two img2dataset shards (the second truncated) and a FaceCaption-style parquet."""

    def download(url: str, image: Image.Image, original: tuple[int, int] | None = None) -> dict:
        sample = {"url": url, "caption": f"laion caption of {url}", "image": image}
        return sample if original is None else {**sample, "original_size": original}

    downloads = [
        [
            # stored at its original size, two faces
            download(
                "http://a/0.jpg", _scene((80, 60), [((20, 10, 50, 40), RED), ((55, 20, 75, 50), GREEN)])
            ),
            # img2dataset keep_ratio: 160x120 stored as 80x60, so boxes halve
            download("http://a/1.jpg", _scene((80, 60), [((20, 10, 50, 40), RED)]), (160, 120)),
            # img2dataset border: 100x50 fitted into 64x64 (scale 0.64, 16 px bands above and below)
            download("http://a/2.jpg", _scene((64, 64), [((6, 22, 26, 42), RED)]), (100, 50)),
        ],
        [
            download("http://b/0.jpg", _scene((40, 40), [((5, 5, 35, 35), RED)])),
            download("http://b/1.jpg", _scene((40, 40), [((5, 5, 35, 35), RED)])),
        ],
    ]
    tars = write_img2dataset(tmp_path / "laion-face", downloads)
    data = tars[1].read_bytes()
    with tarfile.open(tars[1]) as tar:
        cut = tar.getmember("000010001.jpg").offset_data + 50  # inside the second image
    tars[1].write_bytes(data[:cut])
    rows = [
        ("http://a/0.jpg", [20, 10, 50, 40], "a red face", "ok"),
        ("http://a/0.jpg", [55, 20, 75, 50], "a green face", "ok"),
        ("http://a/1.jpg", [40, 20, 100, 80], "a halved face", "ok"),
        ("http://a/2.jpg", [10, 10, 40, 40], "a bordered face", "ok"),
        ("http://b/0.jpg", "[5, 5, 35, 35]", "a face from the damaged shard", "ok"),
        ("http://a/0.jpg", [20, 10, 50, 40], "the same face again", "dup"),
        ("http://b/1.jpg", [5, 5, 35, 35], "its image was in the truncated part", "lost"),
        ("http://nowhere/9.jpg", [1, 1, 30, 30], "never downloaded", "404"),
        ("http://a/0.jpg", "[1, 2, 3]", "three numbers", "bad"),
        ("http://a/0.jpg", [500, 500, 600, 600], "outside the image", "bad"),
        ("http://a/0.jpg", [1, 1, 4, 4], "too small", "small"),
        ("http://a/0.jpg", [2, 2, 40, 40], "   ", "empty"),
        ("http://a/0.jpg", [3, 3, 40, 40], None, "none"),
    ]
    table = pd.DataFrame(rows, columns=["url", "face_bbox", "face_caption", "laion_caption"])
    table["face_bbox"] = table["face_bbox"].map(str)  # a string column, as a CSV-born parquet has
    parquet = tmp_path / "FaceCaption-v1.parquet"
    table.to_parquet(parquet)
    return parquet, tmp_path / "laion-face"


def _mean(jpeg: bytes) -> np.ndarray:
    """Mean colour of the crop's inner part (JPEG bleeds a pixel or two at colour edges)."""
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=float)
    h, w = pixels.shape[:2]
    return pixels[h // 5 : h - h // 5, w // 5 : w - w // 5].reshape(-1, 3).mean(0)


def test_faces_are_matched_by_url_cropped_by_box_and_bad_rows_counted(facecaption, tmp_path):
    parquet, downloads = facecaption
    source = FaceCaptionSource(parquet, downloads)
    config = JobConfig(
        tmp_path / "out",
        samples_per_shard=4,
        hygiene=HygieneConfig(face_margin=0.0, square_crop=False, min_face_size=8),
        progress=False,
    )
    report = run_job(source, config)
    assert report["skipped_by_reason"] == {
        "bad_box": 2,
        "box_mismatch": 1,  # the border-mode image, under --resize-mode auto
        "duplicate_key": 1,
        "empty_caption": 1,
        "missing_caption": 1,
        "not_downloaded": 2,  # nowhere/9.jpg, and b/1.jpg whose bytes the truncation took
        "small_face": 1,
        "truncated_tar": 1,
    }
    samples = {json.loads(s["json"])["caption"]: s for s in read_shards(tmp_path / "out").values()}
    assert sorted(samples) == ["a face from the damaged shard", "a green face", "a halved face", "a red face"]
    for caption, colour in [("a red face", RED), ("a green face", GREEN), ("a halved face", RED)]:
        assert np.abs(_mean(samples[caption]["jpg"]) - colour).max() < 12, caption
    record = json.loads(samples["a halved face"]["json"])
    assert record["url"] == "http://a/1.jpg" and record["face_box"] == [40, 20, 100, 80]
    assert record["crop"] == [20, 10, 50, 40] and (record["width"], record["height"]) == (30, 30)
    assert record["laion_caption"] == "ok" and record["source"].endswith("00000.tar#000000001.jpg")


def test_border_mode_downloads_map_boxes_and_the_command_line_runs_two_workers(facecaption, tmp_path, capsys):
    parquet, downloads = facecaption
    out = tmp_path / "out"
    argv = ["facecaption15m", "--parquet", str(parquet), "--images", str(downloads), "-o", str(out)]
    argv += ["--resize-mode", "border", "--face-margin", "0.25", "--workers", "2", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert json.loads(capsys.readouterr().out)["samples"] == report["samples"]
    assert "box_mismatch" not in report["skipped_by_reason"]
    samples = {json.loads(s["json"])["caption"]: s for s in read_shards(out).values()}
    bordered = json.loads(samples["a bordered face"]["json"])
    # box (10,10,40,40) * 0.64 + (0, 16) = (6.4, 22.4, 25.6, 41.6): side 19.2, centre (16, 32);
    # with 25% margin on each side a 28.8 square: (1.6, 17.6, 30.4, 46.4)
    assert bordered["crop"] == [2, 18, 30, 46]
    red = np.asarray(Image.open(io.BytesIO(samples["a bordered face"]["jpg"])))[4:20, 4:20]
    assert np.abs(red.reshape(-1, 3).mean(0) - RED).max() < 15


@pytest.mark.parametrize(
    ("mode", "stored", "original", "box", "expected"),
    [
        ("auto", (80, 60), (80, 60), (1, 2, 3, 4), (1, 2, 3, 4)),
        ("auto", (100, 75), (400, 300), (40, 40, 80, 120), (10, 10, 20, 30)),
        ("border", (256, 256), (512, 256), (0, 0, 512, 256), (0, 64, 256, 192)),
        ("center_crop", (256, 256), (512, 256), (128, 0, 384, 256), (0, 0, 256, 256)),
    ],
)
def test_boxes_map_into_the_pixels_img2dataset_stored(mode, stored, original, box, expected):
    download = Download("x.tar", "k.jpg", 0, 1, *stored, *original)
    assert map_box(box, download, mode) == pytest.approx(expected)


def test_a_non_uniform_resize_cannot_be_guessed():
    with pytest.raises(SkipSample, match="--resize-mode border or center_crop") as info:
        map_box((0, 0, 10, 10), Download("x.tar", "k.jpg", 0, 1, 256, 256, 512, 256), "auto")
    assert info.value.reason == "box_mismatch"


@pytest.mark.parametrize(
    ("value", "fmt", "expected"),
    [
        ([1, 2, 3, 4], "xyxy", (1, 2, 3, 4)),
        (np.array([1.0, 2.0, 3.0, 4.0]), "xywh", (1, 2, 4, 6)),
        ("[1, 2, 3, 4]", "xyxy", (1, 2, 3, 4)),
        ({"x": 1, "y": 2, "w": 3, "h": 4}, "xywh", (1, 2, 4, 6)),
    ],
)
def test_box_cells_in_every_shape(value, fmt, expected):
    assert parse_box(value, fmt) == expected


@pytest.mark.parametrize("value", ["[1, 2]", "nonsense", [4, 4, 1, 1], [1, 2, float("nan"), 4], None])
def test_malformed_boxes_are_bad_boxes(value):
    with pytest.raises(SkipSample) as info:
        parse_box(value, "xyxy")
    assert info.value.reason == "bad_box"


def test_a_wrong_column_name_fails_listing_the_columns(facecaption, tmp_path):
    parquet, downloads = facecaption
    with pytest.raises(ValueError, match=r"no box column 'bbox' \(set it with --box-column\).*'face_bbox'"):
        run_job(
            FaceCaptionSource(parquet, downloads, box_column="bbox"),
            JobConfig(tmp_path / "o", progress=False),
        )
