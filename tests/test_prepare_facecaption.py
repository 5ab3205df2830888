"""`flip-data facecaption15m`: parquet rows matched to img2dataset downloads by url, faces cropped by box."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from flip.cli.data import main
from flip.prepare.align import AlignConfig, template
from flip.prepare.faces import Face, FacePolicy
from flip.prepare.hygiene import HygieneConfig, SkipSample
from flip.prepare.in_box import SEARCH_SIZE, best_match, box_iou, search_region
from flip.prepare.samples import FaceSteps
from flip.prepare.sources.facecaption import Download, FaceCaptionSource, map_box, parse_box
from flip.prepare.writer import JobConfig, run_job

from .helpers import read_shards, write_img2dataset
from .helpers.faces import ASTRONAUT_EYES_256, astronaut

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


# --align: landmarks found around each row's box -------------------------------------------------

TURN = 15.0  # degrees the second photo is turned (counter-clockwise, PIL's sense) about its centre


def _turned(points: np.ndarray, angle: float, centre: tuple[float, float]) -> np.ndarray:
    """Where PIL's `rotate(angle)` about `centre` moves `points` (image axes: y points down)."""
    a = np.radians(angle)
    offset = points - centre
    x = offset[:, 0] * np.cos(a) + offset[:, 1] * np.sin(a)
    y = -offset[:, 0] * np.sin(a) + offset[:, 1] * np.cos(a)
    return np.stack([x, y], axis=1) + centre


@pytest.fixture
def astronaut_rows(tmp_path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Real faces with known eyes in img2dataset downloads, and a parquet row per face; the
    boxes are a little larger than MTCNN's, as RetinaFace's are. Returns the eyes in the
    pixels of each stored image, by caption."""
    upright = astronaut(512)  # MTCNN's box here: (181, 62, 268, 172)
    turned = astronaut(512).rotate(TURN, resample=Image.Resampling.BICUBIC, center=(256, 256))
    eyes = ASTRONAUT_EYES_256 * 2
    turned_eyes = _turned(eyes, TURN, (256, 256))
    centre = (turned_eyes[0] + turned_eyes[1]) / 2  # the box follows the face, 95 x 115 around the eyes
    turned_box = np.concatenate([centre - np.array([48, 45]), centre + np.array([48, 70])]).tolist()
    wall = Image.new("RGB", (400, 300), (150, 140, 130))
    downloads = [
        [
            {"url": "http://a/up.jpg", "caption": "x", "image": upright},
            # img2dataset keep_ratio: a 1024 px original stored at 512, so the box halves
            {"url": "http://a/turned.jpg", "caption": "x", "image": turned, "original_size": (1024, 1024)},
            {"url": "http://a/wall.jpg", "caption": "x", "image": wall},
        ]
    ]
    write_img2dataset(tmp_path / "laion-face", downloads)
    rows = [
        ("http://a/up.jpg", [176, 56, 272, 176], "an upright face"),
        ("http://a/turned.jpg", [2 * v for v in turned_box], "a turned face"),
        ("http://a/wall.jpg", [100, 80, 220, 220], "a box on a wall"),
    ]
    parquet = tmp_path / "FaceCaption-v1.parquet"
    pd.DataFrame(rows, columns=["url", "face_bbox", "face_caption"]).to_parquet(parquet)
    return parquet, tmp_path / "laion-face", {"an upright face": eyes, "a turned face": turned_eyes}


def _align_argv(parquet: Path, downloads: Path, out: Path) -> list[str]:
    argv = ["facecaption15m", "--parquet", str(parquet), "--images", str(downloads), "-o", str(out)]
    return [*argv, "--align", "--align-size", "112", "--workers", "1", "--no-progress"]


def test_aligned_rows_put_their_eyes_on_the_template_and_a_box_without_a_face_is_skipped(
    astronaut_rows, tmp_path
):
    parquet, downloads, eyes = astronaut_rows
    out = tmp_path / "out"
    assert main(_align_argv(parquet, downloads, out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == {"items": 3, "skipped": 1, "written": 2}
    assert report["skipped_by_reason"] == {"no_face_in_box": 1}
    assert report["faces"]["selected"] == 2
    assert report["settings"]["align"] == {"template": "arcface_112", "size": 112, "padding": 0.0}
    target = template(AlignConfig(112))[:2]
    samples = {json.loads(s["json"])["caption"]: s for s in read_shards(out).values()}
    assert sorted(samples) == ["a turned face", "an upright face"]
    rows = pd.read_parquet(parquet).set_index("face_caption")["face_bbox"]
    angles = {}
    for caption, sample in samples.items():
        record = json.loads(sample["json"])
        matrix = np.array(record["align"]["matrix"])
        # the eyes read off the photo (not the detector's landmarks) land on the template's
        landed = eyes[caption] @ matrix[:, :2].T + matrix[:, 2]
        assert np.abs(landed - target).max() < 4.0, (caption, landed.round(1).tolist())
        angles[caption] = np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0]))
        # the row's box stays: as given (original pixels) and as mapped into the stored image
        given = [float(v) for v in rows[caption]]
        assert record["face_box"] == pytest.approx(given) and record["box_format"] == "xyxy"
        scale = 0.5 if caption == "a turned face" else 1.0
        assert record["face"]["given_box"] == pytest.approx([v * scale for v in given], abs=0.01)
        assert record["face"]["iou"] == pytest.approx(
            box_iou(record["face"]["box"], record["face"]["given_box"]), abs=1e-3
        )
        assert record["face"]["iou"] > 0.5 and len(record["face"]["landmarks"]) == 5
        assert "crop" not in record and Image.open(io.BytesIO(sample["jpg"])).size == (112, 112)
    # the turned photo's warp turns it back: its rotation differs from the upright one's by the turn
    assert angles["a turned face"] - angles["an upright face"] == pytest.approx(TURN, abs=2.0)
    (wall,) = report["examples"]["no_face_in_box"]
    assert "around the box (100.0, 80.0, 220.0, 220.0)" in wall["detail"]


def test_without_align_the_rows_are_cropped_as_before_and_no_detector_runs(astronaut_rows, tmp_path):
    parquet, downloads, _ = astronaut_rows
    out = tmp_path / "out"
    argv = [a for a in _align_argv(parquet, downloads, out) if a not in ("--align", "--align-size", "112")]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["samples"]["written"] == 3 and report["faces"] is None
    assert report["settings"]["detector"] is None and "align" not in report["settings"]
    for sample in read_shards(out).values():
        record = json.loads(sample["json"])
        assert "crop" in record and "face" not in record and "align" not in record


def test_aligned_parts_add_up_to_one_machine(astronaut_rows, tmp_path):
    parquet, downloads, _ = astronaut_rows
    one, many = tmp_path / "one", tmp_path / "many"
    assert main(_align_argv(parquet, downloads, one)) == 0
    for k, rows in ((2, 2), (0, 1), (3, 0), (1, 0)):  # the keys hash to parts 2, 0 and 2
        assert main([*_align_argv(parquet, downloads, many), "--num-parts", "4", "--part", str(k)]) == 0
        part = json.loads((many / f"part-{k:05d}-of-00004-report.json").read_text())
        assert part["samples"]["items"] == rows
    assert main(["merge-report", str(many)]) == 0
    merged = json.loads((many / "report.json").read_text())
    assert merged["skipped_by_reason"] == {"no_face_in_box": 1}
    assert merged["samples"]["written"] == 2
    whole, parts = read_shards(one), read_shards(many)
    assert sorted(parts) == sorted(whole) and len(whole) == 2
    for key, sample in whole.items():  # MTCNN's float sums depend on its batch: equal up to ~1e-5 px
        ours, theirs = json.loads(parts[key]["json"]), json.loads(sample["json"])
        matrices = [np.array(r.pop("align").pop("matrix")) for r in (ours, theirs)]
        assert np.abs(matrices[0] - matrices[1]).max() < 1e-3
        faces = [r.pop("face") for r in (ours, theirs)]
        assert faces[0]["given_box"] == faces[1]["given_box"]
        assert np.abs(np.subtract(faces[0]["landmarks"], faces[1]["landmarks"])).max() < 0.02
        assert ours == theirs and parts[key]["txt"] == sample["txt"]
        pixels = [np.asarray(Image.open(io.BytesIO(s["jpg"])), dtype=float) for s in (parts[key], sample)]
        assert np.abs(pixels[0] - pixels[1]).mean() < 1.0


def test_the_face_matching_the_given_box_best_is_chosen():
    box = (100.0, 100.0, 200.0, 220.0)
    left, top, side = search_region(box)
    assert (left, top, side) == (60, 70, 180)  # the longer side 120 px * 1.5, centred on (150, 160)
    rng = np.random.default_rng(0)
    for _ in range(50):
        boxes = rng.uniform(0, 300, size=(4, 2))
        faces = [
            Face((x, y, x + w, y + h), 0.99)
            for (x, y), (w, h) in zip(boxes, rng.uniform(20, 150, (4, 2)), strict=True)
        ]
        ious = []
        for face in faces:  # the reference: areas of the rectangles, by hand
            ix = max(0.0, min(face.box[2], box[2]) - max(face.box[0], box[0]))
            iy = max(0.0, min(face.box[3], box[3]) - max(face.box[1], box[1]))
            union = face.area + 100 * 120 - ix * iy
            ious.append(ix * iy / union)
        match = best_match(faces, box)
        if max(ious) < 0.3:
            assert match is None
        else:
            assert match is not None and match[0] is faces[int(np.argmax(ious))]
            assert match[1] == pytest.approx(max(ious))
    assert best_match([], box) is None


MARKS = ((60.0, 70.0), (100.0, 70.0), (80.0, 90.0), (65.0, 110.0), (95.0, 110.0))
CENTRED = Face((30.0, 25.0, 130.0, 140.0), 0.9, MARKS)  # the given box spans (26.7, 26.7)-(133.3, 133.3)
CORNER = Face((0.0, 0.0, 25.0, 25.0), 0.999, MARKS)


@dataclass
class ScriptedDetector:
    """Finds, in every search region it is shown, a small confident face in the corner and a
    less confident one over the given box (region pixels): what the counting and the mapping
    back to image pixels are checked against."""

    name: ClassVar[str] = "scripted"
    landmarks: ClassVar[bool] = True

    def load(self) -> None: ...

    def check(self) -> None: ...

    def detect_batch(self, images: list[Image.Image]) -> list[list[Face]]:
        assert all(image.size == (SEARCH_SIZE, SEARCH_SIZE) for image in images)
        return [[CORNER, CENTRED] for _ in images]


@pytest.mark.parametrize("min_confidence", [0.5, 0.95])
def test_faces_around_a_box_are_counted_and_the_match_mapped_back_to_image_pixels(
    astronaut_rows, tmp_path, min_confidence
):
    parquet, downloads, _ = astronaut_rows
    detector = ScriptedDetector()
    steps = FaceSteps(detector, FacePolicy(min_confidence, 0, "largest"), AlignConfig(112))
    report = run_job(
        FaceCaptionSource(parquet, downloads), JobConfig(tmp_path / "o", faces=steps, progress=False)
    )
    if min_confidence > 0.9:  # the matching face is not confident enough: every row is skipped
        assert report["skipped_by_reason"] == {"low_confidence": 3}
        assert report["faces"] == {
            "detected": 6,
            "selected": 0,
            "rejected": {"low_confidence": 3, "not_in_box": 3},
        }
        return
    assert report["skipped_by_reason"] == {}
    assert report["faces"] == {"detected": 6, "selected": 3, "rejected": {"not_in_box": 3}}
    for sample in read_shards(tmp_path / "o").values():
        record = json.loads(sample["json"])
        left, top, side = search_region(record["face"]["given_box"])
        scale = side / SEARCH_SIZE  # region pixel centres onto image pixel centres
        box = [left + (CENTRED.box[0] + 0.5) * scale - 0.5, top + (CENTRED.box[1] + 0.5) * scale - 0.5]
        box += [left + (CENTRED.box[2] + 0.5) * scale - 0.5, top + (CENTRED.box[3] + 0.5) * scale - 0.5]
        assert record["face"]["box"] == pytest.approx(box, abs=0.01)
        marks = (np.array(MARKS) + 0.5) * scale - 0.5 + (left, top)
        assert np.abs(np.array(record["face"]["landmarks"]) - marks).max() < 0.01
        assert record["face"]["detector"] == "scripted" and record["face"]["confidence"] == 0.9
