"""MM-CelebA-HQ (celeba_caption): the reader on its published layout, and retrieval end to end."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flip.benchmarks import read_celeba_caption
from flip.benchmarks.base import MalformedFileError
from flip.benchmarks.celeba_caption import MISSING_IMAGE, PICKLE_TO_TEXT

from .helpers import COLOURS, ROOT, compose_eval, eval_overrides, run_retrieval, write_square

NAMES = list(COLOURS)


def _captions(image_id: int) -> list[str]:
    colour = NAMES[image_id % 3]
    return [f"a {colour} face number {image_id}, caption {c}" for c in range(10)]


def make_celeba_caption(
    root: Path,
    ids: range = range(27000, 27009),
    test: list[str] | None = None,
    caption_dir: str = "celeba-caption",
    image_dir: str = "CelebA-HQ-img",
    list_file: str | None = "test/filenames.txt",
) -> Path:
    """The published layout: `celeba-caption/<N>.txt` (ten lines), `CelebA-HQ-img/<N>.jpg`, and the
    test ids as a plain text list."""
    for image_id in ids:
        path = root / caption_dir / f"{image_id}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(_captions(image_id)))  # as create_caption.py writes: no final newline
        write_square(root / image_dir / f"{image_id}.jpg", COLOURS[NAMES[image_id % 3]], seed=image_id)
    if list_file is not None:
        (root / list_file).parent.mkdir(parents=True, exist_ok=True)
        (root / list_file).write_text("\n".join(test or [str(i) for i in ids]) + "\n")
    return root


def test_the_published_layout_reads_every_caption_of_every_listed_image(tmp_path):
    root = make_celeba_caption(tmp_path / "mm", test=["27004", "27001", "27002.jpg", "", "27008"])
    (root / "celeba-caption" / "27001.txt").write_text("first\r\n\r\n  second  \r\n")  # CRLF, a blank line
    (root / "CelebA-HQ-img" / "27008.jpg").unlink()
    split = read_celeba_caption(root, "test")
    assert split.keys == ["27004", "27001", "27002"]  # the list's order; 27002.jpg read as id 27002
    assert split.captions == [_captions(27004), ["first", "second"], _captions(27002)]
    assert split.images.paths == tuple(str(root / "CelebA-HQ-img" / f"{k}.jpg") for k in split.keys)
    assert split.skipped_by_reason == {MISSING_IMAGE: 1} and split.skipped == 1
    assert split.task == "multitask" and split.label_names == [] and split.targets.shape == (3, 0)
    assert split.info == {
        "list": "test/filenames.txt",
        "caption_dir": "celeba-caption",
        "image_dir": "CelebA-HQ-img",
        "captions": 22,
        "captions_per_image": {"min": 2, "max": 10},
    }
    assert split.subset([2, 0]).captions == [_captions(27002), _captions(27004)]


def test_the_obvious_variants_of_the_layout_are_found(tmp_path):
    root = make_celeba_caption(
        tmp_path / "mm", caption_dir="celeba_caption", image_dir="image", list_file="test.txt"
    )
    split = read_celeba_caption(root, "test")
    assert (
        len(split) == 9 and split.info["caption_dir"] == "celeba_caption" and split.info["list"] == "test.txt"
    )
    root = make_celeba_caption(
        tmp_path / "mask", image_dir="CelebAMask-HQ/CelebA-HQ-img", list_file="train.txt"
    )
    assert read_celeba_caption(root, "train").info["image_dir"] == "CelebAMask-HQ/CelebA-HQ-img"
    with pytest.raises(ValueError, match=r"celeba_caption has no split 'val'; it has \['train', 'test'\]"):
        read_celeba_caption(root, "val")


def test_a_published_pickle_is_never_loaded_and_the_error_says_how_to_make_the_text_list(
    tmp_path, monkeypatch
):
    root = make_celeba_caption(tmp_path / "mm", list_file=None)
    (root / "test").mkdir()
    with open(root / "test" / "filenames.pickle", "wb") as f:  # made here, by the test: trusted
        pickle.dump(["27003", "27005"], f, protocol=2)

    def refuse(*args, **kwargs):
        raise AssertionError("the reader unpickled a file")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    with pytest.raises(FileNotFoundError, match="pickle, which FLIP never loads") as error:
        read_celeba_caption(root, "test")
    assert PICKLE_TO_TEXT in str(error.value)
    # the command the error and the docs give, run as a user runs it in ROOT
    subprocess.run(PICKLE_TO_TEXT, shell=True, cwd=root, check=True)
    assert read_celeba_caption(root, "test").keys == ["27003", "27005"]
    assert PICKLE_TO_TEXT in (ROOT / "docs" / "evaluation.md").read_text()


@pytest.mark.parametrize(
    ("breaks", "where", "problem"),
    [
        (
            lambda root: (root / "celeba-caption" / "27002.txt").write_text("\n \n"),
            "27002.txt",
            "holds no captions",
        ),
        (
            lambda root: (root / "celeba-caption" / "27005.txt").unlink(),
            "filenames.txt, line 6",
            "no caption file",
        ),
        (
            lambda root: (root / "test" / "filenames.txt").write_text("27000\n../27001\n"),
            "line 2",
            "not an image id",
        ),
        (
            lambda root: (root / "test" / "filenames.txt").write_text("27000\n\n27000\n"),
            "line 3",
            "first on line 1",
        ),
        (lambda root: (root / "test" / "filenames.txt").write_text("\n"), "filenames.txt", "holds no ids"),
        (
            lambda root: (root / "celeba-caption" / "27000.txt").write_bytes(b"ok\n\xff\xfe"),
            "line 2",
            "not UTF-8",
        ),
    ],
)
def test_a_malformed_file_fails_naming_the_file_and_line(tmp_path, breaks, where, problem):
    root = make_celeba_caption(tmp_path / "mm")
    breaks(root)
    with pytest.raises(MalformedFileError, match=problem) as error:
        read_celeba_caption(root, "test")
    assert where in str(error.value)


def test_missing_folders_say_what_was_looked_for(tmp_path):
    root = make_celeba_caption(tmp_path / "mm", image_dir="faces")
    with pytest.raises(FileNotFoundError, match=r"image folder: none of .*CelebA-HQ-img"):
        read_celeba_caption(root, "test")
    (root / "test" / "filenames.txt").unlink()
    (root / "faces").rename(root / "images")
    with pytest.raises(FileNotFoundError, match=r"test list: none of .*test/filenames.txt"):
        read_celeba_caption(root, "test")


def test_the_demo_checkpoint_through_eval_retrieval_on_celeba_caption(tmp_path, trained_demo):
    """eval/retrieval.py's run() on the layout above; the recalls equal a ranking by hand."""
    import flip

    root = make_celeba_caption(tmp_path / "mm", ids=range(27000, 27010))
    (root / "CelebA-HQ-img" / "27009.jpg").unlink()  # listed and captioned, but not on disk
    cfg = compose_eval(
        "eval_retrieval", tmp_path, *eval_overrides(tmp_path, trained_demo.ckpt, "celeba_caption", root)
    )
    run_retrieval(cfg)
    out = tmp_path / "out"
    written = json.loads((out / "metrics.json").read_text())
    assert written["benchmark"] == "celeba_caption" and written["task"] == "retrieval"
    assert written["n_test"] == 9 and written["n_texts"] == 90
    assert written["skipped"] == {"test": {MISSING_IMAGE: 1}}
    assert written["split_info"]["test"]["captions_per_image"] == {"min": 10, "max": 10}
    report = (out / "report.md").read_text()
    assert "retrieval on celeba_caption" in report and "i2t R@1" in report and (out / "recalls.png").is_file()

    model = flip.load(trained_demo.ckpt)
    ids = range(27000, 27009)
    with torch.no_grad():
        images = torch.stack(
            [model.preprocess(Image.open(root / "CelebA-HQ-img" / f"{i}.jpg").convert("RGB")) for i in ids]
        )
        image = model.encode_image(images, normalize=True).numpy()
        text = model.encode_text(
            model.tokenize([c for i in ids for c in _captions(i)]), normalize=True
        ).numpy()
    sim, owner = image @ text.T, np.repeat(np.arange(9), 10)
    for k in (1, 5, 10):
        i2t = np.mean([np.isin(np.argsort(-sim[i])[:k], np.flatnonzero(owner == i)).any() for i in range(9)])
        t2i = np.mean([owner[t] in np.argsort(-sim[:, t])[:k] for t in range(90)])
        assert written["summary"][f"i2t_R@{k}"] == pytest.approx(i2t)
        assert written["summary"][f"t2i_R@{k}"] == pytest.approx(t2i)
    assert written["summary"]["t2i_R@10"] == 1.0  # only 9 images
