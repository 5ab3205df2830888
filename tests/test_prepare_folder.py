"""`flip-data folder`: every bad input skipped and counted by reason, every good sample written once."""

from __future__ import annotations

import io
import json
import re
import shlex
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flip.cli.data import main
from flip.prepare.detect import HaarFaceDetector
from flip.prepare.faces import FacePolicy
from flip.prepare.hygiene import HygieneConfig
from flip.prepare.samples import FaceSteps
from flip.prepare.sources.folder import FolderSource, key_from_path
from flip.prepare.writer import JobConfig, run_job

from .helpers import ROOT, read_shards
from .helpers.faces import ALBUM_CAPTIONS, write_album, write_photos


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _bomb_png(side: int = 20_000) -> bytes:
    """A valid PNG header claiming side x side pixels (400 M) with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _noise_jpeg(size: int = 48) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG", quality=90)


def _rotated_jpeg() -> bytes:
    """20 wide x 10 high as stored, EXIF orientation 6: upright it is 10 wide x 20 high."""
    image = Image.new("RGB", (20, 10), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 10, 10))  # left half blue as stored -> top half upright
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(image, "JPEG", exif=exif.tobytes(), quality=95)


# name -> (bytes, expected upright RGB size, expected colour at a probe point) for images that must be kept
GOOD = {
    "rgb.jpg": (
        _encode(Image.new("RGB", (16, 12), (200, 30, 30)), "JPEG", quality=95),
        (16, 12),
        (200, 30, 30),
    ),
    "cmyk.jpg": (
        _encode(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG", quality=95),
        (16, 12),
        (255, 0, 0),
    ),
    "rgba.png": (_encode(Image.new("RGBA", (16, 12), (0, 0, 255, 0)), "PNG"), (16, 12), (255, 255, 255)),
    "palette.png": (
        _encode(Image.new("RGB", (16, 12), (0, 200, 0)).convert("P"), "PNG"),
        (16, 12),
        (0, 200, 0),
    ),
    "deep16.png": (
        _encode(Image.fromarray(np.full((12, 16), 40_000, dtype=np.uint16)), "PNG"),
        (16, 12),
        (156, 156, 156),
    ),  # 40000/65535 of full scale
    "gray.png": (_encode(Image.new("L", (16, 12), 90), "PNG"), (16, 12), (90, 90, 90)),
    "sub/rotated.jpg": (_rotated_jpeg(), (10, 20), None),
}
BAD_IMAGES = {
    "zero.jpg": (b"", "empty_image"),
    "garbage.jpg": (b"<html>404 not found</html>", "corrupt_image"),
    "truncated.jpg": (_noise_jpeg()[:300], "truncated_image"),
    "bomb.png": (_bomb_png(), "decompression_bomb"),
}


def _close(a, b, tol: int = 12) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


@pytest.fixture
def messy_folder(tmp_path) -> tuple[Path, Path]:
    """Images of every kind plus a CSV with missing, empty and non-UTF-8 captions and clashing keys."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name, (data, _, _) in GOOD.items():
        (images / name).write_bytes(data)
    for name, (data, _) in BAD_IMAGES.items():
        (images / name).write_bytes(data)
    (images / "gray.jpg").write_bytes(GOOD["rgb.jpg"][0])  # same stem as gray.png: both kept, own keys
    (images / "unlisted.jpg").write_bytes(GOOD["rgb.jpg"][0])
    (images / "nocaption.jpg").write_bytes(GOOD["rgb.jpg"][0])
    (images / "emptycaption.jpg").write_bytes(GOOD["rgb.jpg"][0])
    (images / "latin1.jpg").write_bytes(GOOD["rgb.jpg"][0])
    lines = [b"file_name,caption,photographer"]
    lines += [f"{name},a photo of {name.split('/')[-1].split('.')[0]},ann".encode() for name in GOOD]
    lines += [f"{name},a photo that cannot be read,bob".encode() for name in BAD_IMAGES]
    lines += [
        b"gray.jpg,same stem as gray.png,carl",
        b"nocaption.jpg",  # a short row: no caption field at all
        b"emptycaption.jpg,   ,dan",
        b"latin1.jpg,caf\xe9 au lait,eve",  # Latin-1, not UTF-8
        b"does_not_exist.jpg,a photo of nothing,fay",
        b'rgb.jpg,"a second caption, with a comma",gus',
    ]
    captions = tmp_path / "captions.csv"
    captions.write_bytes(b"\n".join(lines) + b"\n")
    return images, captions


def test_every_bad_input_is_skipped_and_counted_and_every_good_image_written_once(messy_folder, tmp_path):
    images, captions = messy_folder
    out = tmp_path / "out"
    report = run_job(FolderSource(images, captions), JobConfig(out, samples_per_shard=3, progress=False))
    assert report["skipped_by_reason"] == {
        "corrupt_image": 1,
        "decompression_bomb": 1,
        "empty_caption": 1,
        "empty_image": 1,
        "missing_caption": 2,  # the short row, and unlisted.jpg
        "missing_image": 1,
        "non_utf8_caption": 1,
        "truncated_image": 1,
    }
    assert set(report["reasons"]) == set(report["skipped_by_reason"])
    assert report["examples"]["non_utf8_caption"][0]["sample"] == "captions.csv:16"  # file and line
    samples = read_shards(out)
    # rgb.jpg has two captions -> two samples; every other good image (and gray.jpg) one
    keys = {
        (json.loads(s["json"])["image_path"], json.loads(s["json"]).get("caption_index")): k
        for k, s in samples.items()
    }
    expected = {(n, None) for n in GOOD if n != "rgb.jpg"} | {
        ("rgb.jpg", 0),
        ("rgb.jpg", 1),
        ("gray.jpg", None),
    }
    assert set(keys) == expected
    assert report["samples"]["written"] == len(expected) == 9
    assert keys["gray.png", None] != keys["gray.jpg", None] and keys["gray.png", None].startswith("gray_")
    assert keys["sub/rotated.jpg", None] == key_from_path("sub/rotated.jpg")
    for name, (_, size, colour) in GOOD.items():
        key = keys[name, 0 if name == "rgb.jpg" else None]
        image = Image.open(io.BytesIO(samples[key]["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == size, name
        if colour is not None:
            assert _close(image.getpixel((8, 6)), colour), (name, image.getpixel((8, 6)))
        record = json.loads(samples[key]["json"])
        assert record["image_path"] == name and record["photographer"] == "ann"
        assert record["source"] == str(images / name) and (record["width"], record["height"]) == size
    upright = Image.open(io.BytesIO(samples[keys["sub/rotated.jpg", None]]["jpg"]))
    assert _close(upright.getpixel((5, 4)), (30, 30, 200), 40) and _close(
        upright.getpixel((5, 15)), (200, 30, 30), 40
    )
    assert samples["rgb_1"]["txt"] == b"a second caption, with a comma"
    assert samples["rgb_0"]["jpg"] == GOOD["rgb.jpg"][0]  # a clean JPEG is passed through untouched
    assert json.loads(samples["rgb_1"]["json"])["caption_index"] == 1


def _write_table(path: Path, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    else:
        frame.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_caption_tables_of_every_format_with_custom_columns(tmp_path, suffix):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), (i * 80, 0, 0)).save(images / f"{i}.png")
    rows = [
        {"path": "0.png", "desc": "zero", "id": "k0", "score": 0.5},
        {"path": "1.png", "desc": "one", "id": "k1", "score": 1.5},
        {"path": "0.png", "desc": "zero again", "id": "k0", "score": 0.5},
        {"path": "2.png", "desc": "two", "id": "k2", "score": None},
    ]
    table = tmp_path / f"captions{suffix}"
    _write_table(table, rows)
    source = FolderSource(images, table, image_column="path", caption_column="desc", key_column="id")
    report = run_job(source, JobConfig(tmp_path / "out", samples_per_shard=10, progress=False))
    samples = read_shards(tmp_path / "out")
    assert {k: v["txt"].decode() for k, v in samples.items()} == {
        "k0_0": "zero",
        "k0_1": "zero again",
        "k1": "one",
        "k2": "two",
    }
    assert json.loads(samples["k1"]["json"])["score"] in (1.5, "1.5")
    assert json.loads(samples["k2"]["json"])["score"] in (None, "")  # NaN is stored as null, never NaN
    assert report["skipped_by_reason"] == ({"bad_row": 1} if suffix == ".jsonl" else {})

    first = FolderSource(images, table, "path", "desc", "id", multi_caption="first")
    run_job(first, JobConfig(tmp_path / "first", samples_per_shard=10, progress=False))
    again = read_shards(tmp_path / "first")
    assert sorted(again) == ["k0", "k1", "k2"]
    assert json.loads(again["k0"]["json"])["captions"] == ["zero", "zero again"]


def test_list_cells_hold_many_captions_and_bad_ones_among_them_are_counted(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (10, 10)).save(images / "a.jpg")
    table = tmp_path / "meta.parquet"
    pd.DataFrame({"file_name": ["a.jpg"], "text": [["first", "", "second", None]]}).to_parquet(table)
    report = run_job(FolderSource(images, table), JobConfig(tmp_path / "out", progress=False))
    samples = read_shards(tmp_path / "out")
    assert {k: v["txt"] for k, v in samples.items()} == {"a_0": b"first", "a_1": b"second"}
    assert report["skipped_by_reason"] == {"empty_caption": 1, "missing_caption": 1}


def test_wrong_column_names_fail_listing_the_columns_there_are(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    table = tmp_path / "c.csv"
    table.write_text("img,words\na.jpg,hello\n")
    with pytest.raises(
        ValueError, match=r"none of the default image columns .* --image-column .*'img', 'words'"
    ):
        run_job(FolderSource(images, table), JobConfig(tmp_path / "out", progress=False))
    with pytest.raises(ValueError, match=r"no caption column 'caption'; the file has columns 'img', 'words'"):
        run_job(FolderSource(images, table, "img", "caption"), JobConfig(tmp_path / "o2", progress=False))


def _many_images(tmp_path: Path, count: int) -> tuple[Path, Path]:
    images = tmp_path / "many"
    images.mkdir()
    rng = np.random.default_rng(1)
    lines = ["file_name,caption"]
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
        lines.append(f"{i:03d}.png,picture number {i}")
    (images / "007.png").write_bytes(b"broken")
    (tmp_path / "many.csv").write_text("\n".join(lines) + "\n")
    return images, tmp_path / "many.csv"


def test_resume_skips_finished_shards_and_output_is_the_same_for_any_worker_count(tmp_path):
    images, captions = _many_images(tmp_path, 20)
    out = tmp_path / "one"
    first = run_job(FolderSource(images, captions), JobConfig(out, samples_per_shard=4, progress=False))
    assert first["shards"] == [f"{i:05d}.tar" for i in range(5)] and first["shards_written"] == 5
    assert first["samples"]["written"] == 19 and first["skipped_by_reason"] == {"corrupt_image": 1}
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}

    # a crash while writing shard 3: its stats file (written last) is missing, the tar half there
    (out / "00003_stats.json").unlink()
    (out / "00003.tar").write_bytes(b"half a tar")
    leftover = out / ".00004.tar.k1ll3d.tmp"  # what a SIGKILL while writing a shard leaves behind
    leftover.write_bytes(b"half a tar")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = run_job(FolderSource(images, captions), JobConfig(out, samples_per_shard=4, progress=False))
    assert again["shards_resumed"] == 4 and again["shards_written"] == 1
    assert not leftover.exists() and not list(out.glob(".*.tmp"))
    assert again["samples"] == first["samples"] and again["skipped_by_reason"] == first["skipped_by_reason"]
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert all(stamps[n] == (out / n).stat().st_mtime_ns for n in stamps if n != "00003.tar")

    two = tmp_path / "two"
    parallel = run_job(
        FolderSource(images, captions), JobConfig(two, samples_per_shard=4, workers=2, progress=False)
    )
    assert parallel["samples"] == first["samples"]
    assert {p.name: p.read_bytes() for p in two.glob("*.tar")} == before  # byte-identical

    # other settings rewrite every shard; fewer shards than before remove the stale ones
    changed = run_job(
        FolderSource(images, captions),
        JobConfig(out, samples_per_shard=8, hygiene=HygieneConfig(jpeg_quality=80), progress=False),
    )
    assert changed["shards_resumed"] == 0 and changed["stale_shards_removed"] == ["00003.tar", "00004.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(read_shards(out)) == 19


def test_an_output_folder_with_foreign_shards_is_refused(tmp_path):
    images, captions = _many_images(tmp_path, 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00000.tar").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="flip-data did not write"):
        run_job(FolderSource(images, captions), JobConfig(tmp_path / "out", progress=False))


def test_the_command_line_refuses_foreign_shards_as_a_usage_error(tmp_path, capsys):
    """A wrong --output is the user's to fix (exit 2, naming the file), not a failed write (exit 1)."""
    images, captions = _many_images(tmp_path, 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.tar").write_bytes(b"someone else's")
    with pytest.raises(SystemExit) as exit_:
        main(
            ["folder", str(images), "--captions", str(captions), "-o", str(tmp_path / "out"), "--no-progress"]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'mine.tar'" in err and "could not write" not in err
    assert (tmp_path / "out" / "mine.tar").read_bytes() == b"someone else's"


def test_the_command_line_resizes_and_finds_metadata_files(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (64, 32), (10, 120, 10)).save(images / "wide.png")
    (images / "metadata.jsonl").write_text(
        json.dumps({"file_name": "wide.png", "text": "a green banner"}) + "\n"
    )
    out = tmp_path / "out"
    assert main(["folder", str(images), "-o", str(out), "--resize-short-side", "16", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"]["written"] == 1
    sample = read_shards(out)["wide"]
    assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 16)
    assert sample["txt"] == b"a green banner"
    with pytest.raises(SystemExit) as exit_info:
        main(["folder", str(tmp_path / "nope"), "-o", str(out)])
    assert exit_info.value.code == 2
    assert "image folder" in capsys.readouterr().err


def _face_on_canvas(at: tuple[int, int]) -> Image.Image:
    """A real portrait (Grace Hopper, shipped with matplotlib) pasted into a larger scene."""
    from matplotlib import cbook

    face = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    canvas = Image.new("RGB", (360, 240), (90, 120, 90))
    canvas.paste(face.resize((160, 188)), at)
    return canvas


def test_detect_faces_crops_the_face_and_skips_images_without_one(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    _face_on_canvas((170, 30)).save(images / "face.png")
    Image.new("RGB", (360, 240), (90, 120, 90)).save(images / "empty.png")
    (tmp_path / "c.csv").write_text("file_name,caption\nface.png,a face\nempty.png,a wall\n")
    detector = HaarFaceDetector()
    faces = detector.detect(Image.open(images / "face.png").convert("RGB"))
    x0, y0, x1, y1 = max(faces, key=lambda f: f.area).box
    assert 170 <= x0 < x1 <= 330 and 30 <= y0 < y1 <= 218 and x1 - x0 > 40  # inside the pasted portrait
    report = run_job(
        FolderSource(images, tmp_path / "c.csv"),
        JobConfig(
            tmp_path / "out",
            faces=FaceSteps(detector, FacePolicy(min_size=0)),
            hygiene=HygieneConfig(face_margin=0.1),
            progress=False,
        ),
    )
    assert report["skipped_by_reason"] == {"no_face": 1}
    record = json.loads(read_shards(tmp_path / "out")["face"]["json"])
    left, top, right, bottom = record["crop"]
    side = max(x1 - x0, y1 - y0) * 1.2
    assert abs((right - left) - side) <= 2 and abs((bottom - top) - side) <= 2  # square, 10% margin each side
    assert (record["width"], record["height"]) == (right - left, bottom - top)


def _section(heading: str) -> str:
    """The text of docs/data.md's section that starts with `heading`, up to the next heading."""
    text = (ROOT / "docs" / "data.md").read_text()
    start = text.index(heading)
    end = min(i for i in (text.find("\n## ", start), text.find("\n### ", start + 1)) if i > 0)
    return text[start:end]


def _section_commands(heading: str) -> list[str]:
    """The commands of a docs/data.md section's bash blocks, as the page writes them."""
    blocks = re.findall(r"```bash\n(.*?)```", _section(heading), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def _face_section_commands() -> list[str]:
    """The flip-data commands of docs/data.md's face section, as the page writes them."""
    return _section_commands("### Faces: detection and alignment")


def test_the_documented_face_example_writes_what_the_page_shows(tmp_path, monkeypatch, capsys):
    """docs/data.md's worked example: its photos, its commands run as written (one worker, no
    progress bar added), and the numbers its report excerpts show."""
    write_photos(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    commands = _face_section_commands()
    assert len(commands) == 2 and all(c.startswith("flip-data folder photos") for c in commands)
    for command in commands:
        assert main([*shlex.split(command)[1:], "--workers", "1", "--no-progress"]) == 0
    report = json.loads((tmp_path / "shards" / "report.json").read_text())
    assert report["samples"] == {"items": 4, "skipped": 2, "written": 2}
    assert report["skipped_by_reason"] == {"no_face": 1, "small_face": 1}
    assert report["faces"] == {"detected": 4, "selected": 2, "rejected": {"not_largest": 1, "small_face": 1}}
    assert report["settings"]["align"] == {"template": "arcface_112", "size": 224, "padding": 0.25}
    assert report["settings"]["detector"]["min_face_size"] == 64
    samples = read_shards(tmp_path / "shards")
    assert sorted(samples) == ["astronaut", "pair"]
    pair = json.loads(samples["pair"]["json"])
    assert pair["face"]["box"][2] < 462  # the larger woman, on the left
    assert Image.open(io.BytesIO(samples["pair"]["jpg"])).size == (224, 224)
    assert sorted(read_shards(tmp_path / "shards_all")) == ["astronaut_face0", "pair_face0", "pair_face1"]


def test_the_documented_photos_to_curated_example_removes_what_the_page_says(tmp_path, monkeypatch):
    """docs/data.md's worked example from photos to aligned, curated shards: its album, its two
    commands run as written (one worker, no progress bar added), the numbers and the removal
    lines the page shows."""
    heading = "### From photos to aligned, curated shards"
    section = _section(heading)
    assert all(name in section for name in ALBUM_CAPTIONS) and ALBUM_CAPTIONS["scan.jpg"] in section
    write_album(tmp_path / "album")
    monkeypatch.chdir(tmp_path)
    commands = _section_commands(heading)
    assert [shlex.split(c)[:2] for c in commands] == [["flip-data", "folder"], ["flip-data", "curate"]]
    for command in commands:
        assert main([*shlex.split(command)[1:], "--workers", "1", "--no-progress"]) == 0

    aligned = json.loads((tmp_path / "aligned" / "report.json").read_text())
    assert aligned["samples"] == {"items": 4, "skipped": 0, "written": 4}
    assert aligned["faces"] == {"detected": 4, "selected": 4, "rejected": {}}
    curation = json.loads((tmp_path / "curated" / "curation.json").read_text())
    assert curation["samples"] == {"read": 4, "kept": 2, "removed": 2}
    assert curation["removed_by_filter"] == {
        "caption_too_short": 0,
        "caption_too_long": 0,
        "caption_url": 1,
        "caption_few_letters": 0,
        "caption_repeats": 0,
        "exact_duplicate": 1,
        "near_duplicate": 0,
    }
    page_lines = [json.loads(line) for line in section.splitlines() if line.startswith('{"key": ')]
    written = (tmp_path / "curated" / "curation_removed.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in written] == page_lines and len(page_lines) == 2

    samples = read_shards(tmp_path / "curated")
    assert sorted(samples) == ["astronaut", "portrait"]
    for key, sample in samples.items():
        record = json.loads(sample["json"])
        assert record["caption"] == ALBUM_CAPTIONS[f"{key}.jpg"] and len(record["phash"]) == 16
        assert record["origin"]["source"] == f"album/{key}.jpg"
        assert len(record["origin"]["face"]["landmarks"]) == 5 and record["origin"]["align"]["size"] == 224
        assert Image.open(io.BytesIO(sample["jpg"])).size == (224, 224)
