"""flip-query and flip.query on hostile input: one bad image costs its own answer only,
and a question that cannot be answered faithfully is refused before any work."""

from __future__ import annotations

import json
import math
import re
import struct
import zlib

import pytest
import torch

import flip
from flip.cli.query import cli as flip_query_cli
from flip.cli.query import main as flip_query
from flip.evaluation.attribute_query import UnreadableImage
from flip.evaluation.prompts import DEFAULT_TEMPLATES

from .helpers import jpeg_bytes, save_checkpoint

QUESTION = ["--attributes", "eyeglasses", "smiling"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png() -> bytes:
    """A 60-byte PNG that claims 30000 x 30000 pixels: 900 MP, ten times PIL's bomb limit."""
    header = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)  # 1-bit greyscale
    rows = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture
def mixed_inputs(tmp_path):
    """Good faces interleaved with every kind of file that cannot be answered, in input order."""
    folder = tmp_path / "in"
    folder.mkdir()
    good = []
    for i, colour in enumerate([(200, 150, 120), (90, 60, 40), (230, 200, 180), (120, 90, 70)]):
        path = folder / f"good{i}.jpg"
        path.write_bytes(jpeg_bytes(colour))
        good.append(str(path))
    bad = {
        "bomb": folder / "bomb.png",
        "truncated": folder / "truncated.jpg",
        "corrupt": folder / "corrupt.jpg",
        "not_an_image": folder / "notes.txt",
        "missing": folder / "missing.jpg",
        "dangling_link": folder / "link.jpg",
        "empty_folder": folder / "empty",
    }
    bad["bomb"].write_bytes(decompression_bomb_png())
    bad["truncated"].write_bytes(jpeg_bytes((10, 20, 30))[:300])
    bad["corrupt"].write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50)
    bad["not_an_image"].write_text("not an image at all\n")
    bad["dangling_link"].symlink_to(folder / "nowhere.jpg")
    bad["empty_folder"].mkdir()
    order = [
        good[0],
        str(bad["bomb"]),
        good[1],
        str(bad["truncated"]),
        str(bad["corrupt"]),
        good[2],
        str(bad["not_an_image"]),
        str(bad["missing"]),
        str(bad["dangling_link"]),
        str(bad["empty_folder"]),
        good[3],
    ]
    return order, good, {str(v): k for k, v in bad.items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_each_unreadable_image_gets_its_own_error_line_and_the_rest_are_answered(
    tiny_model, tmp_path, capsys, mixed_inputs, workers
):
    order, good, bad = mixed_inputs
    ckpt = save_checkpoint(tiny_model, tmp_path / "tiny.ckpt")
    options = ["--batch-size", "2", "--workers", str(workers)]
    code = flip_query(["--ckpt", str(ckpt), *QUESTION, *options, "--", *order])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["image"] for line in lines] == order  # one line per input, in input order
    errors = {line["image"]: line["error"] for line in lines if "error" in line}
    assert set(errors) == set(bad)
    assert "DecompressionBombError" in errors[next(p for p, k in bad.items() if k == "bomb")]
    assert "FileNotFoundError" in errors[next(p for p, k in bad.items() if k == "missing")]
    assert "folder" in errors[next(p for p, k in bad.items() if k == "empty_folder")]
    answered = [line for line in lines if "error" not in line]
    assert [line["image"] for line in answered] == good
    expected = flip.query(tiny_model, good, ["eyeglasses", "smiling"])
    got = torch.tensor([[r["probabilities"]["eyeglasses"], r["probabilities"]["smiling"]] for r in answered])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert code == 1 and f"{len(bad)} of {len(order)} images" in captured.err


def test_python_query_names_the_bad_image_or_gives_it_a_nan_row(tiny_model, mixed_inputs):
    order, good, bad = mixed_inputs
    bomb = next(p for p, k in bad.items() if k == "bomb")
    with pytest.raises(UnreadableImage, match="DecompressionBombError") as raised:
        flip.query(tiny_model, [good[0], bomb, good[1]], ["eyeglasses"])
    assert raised.value.image == bomb
    probs = flip.query(tiny_model, order, ["eyeglasses", "smiling"], batch_size=3, errors="nan")
    assert probs.shape == (len(order), 2)
    rows_ok = [i for i, path in enumerate(order) if path not in bad]
    assert all(math.isnan(v) for i, path in enumerate(order) if path in bad for v in probs[i].tolist())
    torch.testing.assert_close(probs[rows_ok], flip.query(tiny_model, good, ["eyeglasses", "smiling"]))
    with pytest.raises(UnreadableImage, match=r"tensor\(3, 8\).*\[C, H, W\]"):
        flip.query(tiny_model, [torch.zeros(3, 8)], ["eyeglasses"])


@pytest.mark.parametrize(
    "question, message",
    [
        (["--attributes", ""], "non-blank"),
        (["--attributes", "eyeglasses", "   "], "non-blank"),
        (["--choices", "happy"], "at least 2 choices.*1.0 for every image"),
        (["--attributes", "x" * 10_000], r"xxx\.\.\. \(10000 characters\).*context length of 24 tokens"),
        (["--choices", "happy", "very " * 40 + "sad"], r"'very very .*context length of 24 tokens"),
    ],
)
def test_a_question_that_cannot_be_answered_faithfully_is_refused(
    tiny_model, tmp_path, capsys, monkeypatch, question, message
):
    image = tmp_path / "face.jpg"
    image.write_bytes(jpeg_bytes((200, 150, 120)))
    ckpt = save_checkpoint(tiny_model, tmp_path / "tiny.ckpt")
    monkeypatch.setattr("sys.argv", ["flip-query", "--ckpt", str(ckpt), *question, "--", str(image)])
    with pytest.raises(SystemExit) as exited:
        flip_query_cli()
    captured = capsys.readouterr()
    assert exited.value.code == 2 and captured.out == ""  # nothing answered
    assert "flip-query: error:" in captured.err
    assert re.search(message, captured.err, flags=re.S), captured.err
    kind = "attributes" if question[0] == "--attributes" else "choices"
    with pytest.raises(ValueError, match=message):
        flip.query(tiny_model, [image], **{kind: question[1:]})


def test_prompt_phrases_must_be_non_empty_and_fit_the_context(tiny_model, tmp_path):
    image = tmp_path / "face.jpg"
    image.write_bytes(jpeg_bytes((200, 150, 120)))
    with pytest.raises(ValueError, match=r"prompts for 'calm' must be a non-empty list"):
        flip.query(tiny_model, [image], choices=["calm", "upset"], prompts={"calm": [], "upset": ["upset"]})
    with pytest.raises(ValueError, match=r"'freckles.positive'.*non-blank"):
        flip.query(
            tiny_model, [image], ["freckles"], prompts={"freckles": {"positive": [" "], "negative": ["no"]}}
        )
    long_phrase = {"freckles": {"positive": ["with " + "many " * 30 + "freckles"], "negative": ["without"]}}
    with pytest.raises(ValueError, match=r"'freckles'.*context length of 24"):
        flip.query(tiny_model, [image], ["freckles"], prompts=long_phrase)


def test_a_prompt_that_exactly_fills_the_context_is_answered_and_one_token_more_is_refused(
    tiny_model, tmp_path
):
    image = tmp_path / "face.jpg"
    image.write_bytes(jpeg_bytes((200, 150, 120)))

    def longest(phrase: str) -> int:  # tokens of the longest prompt, start and end tokens included
        return max(len(tiny_model.tokenizer.encode(t.format(phrase))) + 2 for t in DEFAULT_TEMPLATES)

    words = next(n for n in range(1, 30) if longest("with" + " red" * n) == 24)
    exact = {"hat": {"positive": ["with" + " red" * words], "negative": ["without a hat"]}}
    assert 0 < float(flip.query(tiny_model, [image], ["hat"], prompts=exact)) < 1
    over = {"hat": {"positive": ["with" + " red" * (words + 1)], "negative": ["without a hat"]}}
    with pytest.raises(ValueError, match="context length of 24"):
        flip.query(tiny_model, [image], ["hat"], prompts=over)
