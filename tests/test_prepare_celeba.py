"""CelebA's published layout read exactly, its attributes captioned truthfully, and `flip-data celeba`."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from flip.benchmarks.celeba import (
    CELEBA_ATTRIBUTES,
    CelebAFormatError,
    find_celeba,
    read_attribute_file,
    read_celeba,
)
from flip.cli.data import main
from flip.data.captions import CaptionGrammar
from flip.data.celeba_grammar import CELEBA_GRAMMAR
from flip.prepare.sources.celeba import CelebASource

SPLIT_CODES = [0, 0, 0, 0, 0, 1, 1, 2, 2, 2]  # 5 train, 2 val, 3 test


def _attributes(index: int) -> dict[str, bool]:
    rng = random.Random(index)
    return {name: rng.random() < 0.4 for name in CELEBA_ATTRIBUTES}


def _attr_text(count: int, rows: list[tuple[str, dict[str, bool]]]) -> str:
    """The published format: count line, header line, values right-aligned in 2-wide columns."""
    lines = [str(count), " ".join(CELEBA_ATTRIBUTES) + " "]
    for name, values in rows:
        lines.append(name + "".join(f"{(1 if values[a] else -1):>3d}" for a in CELEBA_ATTRIBUTES))
    return "\r\n".join(lines) + "\r\n"


def write_celeba(root: Path, flat: bool = False, count: int = 10) -> list[tuple[str, dict[str, bool], str]]:
    """A tiny CelebA in the official (Anno/ Eval/ Img/) or flat layout; returns (file, attrs, split)."""
    anno, evaluation, images = (
        (root, root, root / "img_align_celeba")
        if flat
        else (root / "Anno", root / "Eval", root / "Img" / "img_align_celeba")
    )
    for folder in (anno, evaluation, images):
        folder.mkdir(parents=True, exist_ok=True)
    rows = [(f"{i + 1:06d}.jpg", _attributes(i)) for i in range(count)]
    (anno / "list_attr_celeba.txt").write_text(_attr_text(count, rows), newline="")
    splits = [SPLIT_CODES[i % len(SPLIT_CODES)] for i in range(count)]
    (evaluation / "list_eval_partition.txt").write_text(
        "".join(f"{name} {code}\n" for (name, _), code in zip(rows, splits, strict=True))
    )
    for i, (name, _) in enumerate(rows):
        Image.new("RGB", (18, 22), (20 * i, 100, 200 - 10 * i)).save(images / name, quality=95)
    return [
        (name, values, ("train", "val", "test")[code])
        for (name, values), code in zip(rows, splits, strict=True)
    ]


@pytest.mark.parametrize("flat", [False, True], ids=["official-layout", "one-folder"])
def test_read_celeba_reads_both_published_layouts_exactly(tmp_path, flat):
    truth = write_celeba(tmp_path, flat=flat)
    records = read_celeba(tmp_path, require_images=True)
    assert [(r.image.name, r.attributes, r.split) for r in records] == truth
    assert records[0].key == "000001" and records[0].image.is_file()
    assert [r.key for r in read_celeba(tmp_path, splits="val")] == ["000006", "000007"]
    assert len(read_celeba(tmp_path, splits=["train", "test"])) == 8
    with pytest.raises(ValueError, match=r"unknown CelebA split\(s\) \['dev'\]; accepted: train, val, test"):
        read_celeba(tmp_path, splits="dev")


def test_values_in_irregular_columns_land_on_the_right_attribute(tmp_path):
    values = dict.fromkeys(CELEBA_ATTRIBUTES, False)
    values["Eyeglasses"] = values["Young"] = values["5_o_Clock_Shadow"] = True
    path = tmp_path / "list_attr_celeba.txt"
    path.write_text(_attr_text(1, [("000001.jpg", values)]))
    assert "000001.jpg  1 -1 -1" in path.read_text()  # really the 2-wide right-aligned layout
    names, records = read_attribute_file(path)
    assert names == list(CELEBA_ATTRIBUTES)
    assert {k for k, v in records["000001.jpg"].items() if v} == {"Eyeglasses", "Young", "5_o_Clock_Shadow"}


HEADER = " ".join(CELEBA_ATTRIBUTES)
ROW = "000001.jpg" + " -1" * 40


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"fewer than two lines"),
        (f"lots\n{HEADER}\n{ROW}\n", r"line 1: expected the number of images \(an integer\), got 'lots'"),
        (f"1\n{ROW}\n{ROW}\n", r"line 2: expected unique attribute names"),
        (f"1\n{HEADER}\n000001.jpg -1 1\n", r"line 3: expected a file name and 40 values .* got 2 values"),
        (f"1\n{HEADER}\n{ROW[:-2]}2\n", r"line 3: attribute Young of 000001.jpg is '2'; expected 1 or -1"),
        (f"2\n{HEADER}\n{ROW}\n{ROW}\n", r"line 4: 000001.jpg is listed twice \(first on line 3\)"),
        (f"5\n{HEADER}\n{ROW}\n", r"line 1: says 5 images but the file lists 1"),
    ],
    ids=["empty", "count", "header", "short-row", "bad-value", "duplicate", "truncated"],
)
def test_malformed_attribute_files_name_file_line_and_expectation(tmp_path, text, message):
    path = tmp_path / "list_attr_celeba.txt"
    path.write_text(text)
    with pytest.raises(CelebAFormatError, match=message) as info:
        read_attribute_file(path)
    assert str(path) in str(info.value)


def test_partition_problems_are_reported_with_their_line(tmp_path):
    write_celeba(tmp_path, flat=True, count=3)
    partition = tmp_path / "list_eval_partition.txt"
    partition.write_text("000001.jpg 0\n000002.jpg 7\n")
    with pytest.raises(
        CelebAFormatError, match=r"list_eval_partition.txt line 2: expected '<file name> <0\|1\|2>'"
    ):
        read_celeba(tmp_path)
    partition.write_text("000001.jpg 0\n000002.jpg 1\n")
    with pytest.raises(CelebAFormatError, match=r"no line for 000003.jpg"):
        read_celeba(tmp_path)


def test_missing_pieces_are_named_with_where_they_were_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        find_celeba(tmp_path / "nope")
    (tmp_path / "list_attr_celeba.txt").write_text("0\n" + HEADER + "\n")
    with pytest.raises(
        FileNotFoundError, match=r"lacks list_eval_partition.txt \(looked for Eval/.*the image folder"
    ):
        find_celeba(tmp_path)


def test_celeba_captions_only_claim_what_the_labels_say():
    grammar = CaptionGrammar(CELEBA_GRAMMAR)
    assert set(grammar.attributes) == set(CELEBA_ATTRIBUTES)
    rng = random.Random(0)
    for i in range(300):
        attributes = {name: rng.random() < 0.35 for name in CELEBA_ATTRIBUTES}
        caption = grammar.caption(attributes, random.Random(i))
        assert caption.mentions, caption.text
        for name, value in caption.mentions:
            assert attributes[name] == value, (caption.text, name, value)
        words = set(caption.text.lower().replace(".", " ").replace(",", " ").split())
        if attributes["Male"]:
            assert not words & {"woman", "lady", "she"}, caption.text
        else:
            assert not words & {"man", "gentleman", "he"}, caption.text
        assert "female" not in words and "male" not in words  # gender is only said by the noun


def test_flip_data_celeba_writes_captioned_shards_and_counts_bad_images(tmp_path, capsys):
    truth = write_celeba(tmp_path / "celeba", count=10)
    images = tmp_path / "celeba" / "Img" / "img_align_celeba"
    (images / "000002.jpg").unlink()  # listed but missing
    (images / "000003.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "shards"
    code = main(
        ["celeba", str(tmp_path / "celeba"), "-o", str(out), "--samples-per-shard", "2", "--workers", "1"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert printed["samples"] == report["samples"] == {"items": 5, "written": 3, "skipped": 2}
    assert report["skipped_by_reason"] == {"corrupt_image": 1, "missing_image": 1}
    assert report["shards"] == ["00000.tar", "00001.tar", "00002.tar"]

    source = CelebASource(tmp_path / "celeba", "train", seed=0)
    expected = {name[:6]: (values, split) for name, values, split in truth if split == "train"}
    seen = {}
    for shard in report["shards"]:
        with tarfile.open(out / shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".")
                seen.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert sorted(seen) == ["000001", "000004", "000005"]
    for key, files in seen.items():
        record = json.loads(files["json"])
        values, split = expected[key]
        assert {a: record[a] for a in CELEBA_ATTRIBUTES} == values and record["split"] == split
        caption = files["txt"].decode()
        assert caption == record["caption"] == source.caption(key, values).text
        assert all(values[name] == value for name, value in record["mentions"])
        assert Image.open(io.BytesIO(files["jpg"])).size == (18, 22)
    # another seed gives other captions for the same images
    other = CelebASource(tmp_path / "celeba", "train", seed=1)
    assert any(other.caption(k, expected[k][0]).text != source.caption(k, expected[k][0]).text for k in seen)
