"""The dense probes: token maps against open_clip's own intermediates, the heads against direct
computations, the test split scored at every label pixel, eval/parsing_probe.py and
eval/landmark_probe.py end to end, and a briefly trained tower beating its random init."""

from __future__ import annotations

import io
import json
import runpy
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flip.benchmarks import read_faceshapes_dense
from flip.benchmarks.base import EncodedImages, LabelledSplit
from flip.benchmarks.dense import PARSING, Crop, DenseLabels, EncodedMasks
from flip.data.faceshapes import ensure_faceshapes
from flip.evaluation.dense_metrics import confusion_matrix, parsing_scores
from flip.evaluation.dense_probe import ParsingProbe
from flip.evaluation.features import SplitFeatures
from flip.evaluation.run import evaluate
from flip.models import build_model
from flip.models.dense_heads import LandmarkHead, TokenMapHead, soft_argmax

from .helpers import ROOT, compose_eval, eval_overrides
from .helpers.evaluation import run_landmark_probe, run_parsing_probe

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "pool_type": "avg"}
TEXT = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


@pytest.fixture(scope="module")
def vit2():
    torch.manual_seed(0)
    return build_model(
        "flip-test-dense-vit", {"embed_dim": 32, "vision_cfg": VISION, "text_cfg": TEXT}
    ).eval()


def test_token_maps_are_open_clips_intermediates_on_the_patch_grid(vit2):
    visual = vit2.clip.visual
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = vit2.patch_token_maps(images, [1, "final"])
        _, hidden = visual.transformer.forward_intermediates(visual._embeds(images), indices=[0, 1])
    assert maps.shape == (2, 2, 32, 4, 4)
    for block, h in enumerate((hidden[0], visual.ln_post(hidden[1]))):
        for row in range(4):
            for col in range(4):  # patch tokens in open_clip's order: row by row over the grid
                torch.testing.assert_close(maps[:, block, :, row, col], h[:, 1 + row * 4 + col])


def test_heads_are_a_layernorm_per_block_and_one_linear_map_per_token():
    torch.manual_seed(2)
    head = TokenMapHead(blocks=2, width=6, out_channels=3)
    maps = torch.randn(2, 2, 6, 3, 5)
    out = head(maps)
    assert out.shape == (2, 3, 3, 5)
    for b, y, x in ((0, 0, 0), (1, 2, 4), (1, 1, 3)):
        tokens = [
            F.layer_norm(maps[b, k, :, y, x], (6,), head.norms[k].weight, head.norms[k].bias) for k in (0, 1)
        ]
        torch.testing.assert_close(out[b, :, y, x], head.linear(torch.cat(tokens)))
    heat = torch.full((1, 2, 8, 8), -30.0)
    heat[0, 0, 2, 5] = heat[0, 1, 7, 0] = 30.0  # one sharp peak per map
    torch.testing.assert_close(soft_argmax(heat), torch.tensor([[[5.5 / 8, 2.5 / 8], [0.5 / 8, 7.5 / 8]]]))
    assert LandmarkHead(2, 6, points=4)(maps).shape == (2, 4, 2)
    with pytest.raises(ValueError, match=r"expected \[B, 2, width, h, w\]"):
        head(maps[:, :1])


class _Logits(torch.nn.Module):
    """A 'head' whose logits are the cached maps themselves: [N, 1, C, h, w] -> [N, C, h, w]."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps[:, 0]


def _bilinear(logits: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """Logits [C, h, w] at (fx, fy) in grid units (cell centres at i + 0.5), edges continued."""
    _, h, w = logits.shape
    x, y = min(max(fx - 0.5, 0), w - 1), min(max(fy - 0.5, 0), h - 1)
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1, ax, ay = min(x0 + 1, w - 1), min(y0 + 1, h - 1), x - x0, y - y0
    top = logits[:, y0, x0] * (1 - ax) + logits[:, y0, x1] * ax
    bottom = logits[:, y1, x0] * (1 - ax) + logits[:, y1, x1] * ax
    return top * (1 - ay) + bottom * ay


def test_the_test_split_is_scored_at_every_pixel_of_its_own_label_images(tmp_path):
    """A face 24 px wide and 12 px high (its crop: the whole image padded to 24 x 24) with a mask
    at half its resolution: each mask pixel takes the logits at its centre through the crop."""
    rng = np.random.default_rng(3)
    classes = ("background", "skin", "hair")
    mask = rng.integers(0, 3, size=(6, 12)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    image = Image.new("RGB", (24, 12))
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG")
    dense = DenseLabels(PARSING, classes, masks=EncodedMasks((buffer.getvalue(),), ("face",)))
    split = LabelledSplit(
        "fixture", "test", "parsing", list(classes), np.zeros((1, 0), np.int8),
        EncodedImages((jpeg.getvalue(),), ("face",)), ["face"], dense=dense,
    )  # fmt: skip
    assert dense.crop(0, 24, 12) == Crop(0, -6, 24)
    logits = torch.randn(1, 1, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    confusion, _ = ParsingProbe(train_split="train").score_test(_Logits(), SplitFeatures(logits, split))
    expected = np.zeros_like(mask)
    for v in range(6):
        for u in range(12):  # mask pixel centre -> image pixels -> crop fraction -> grid units
            fx = ((u + 0.5) * 2 - 0) / 24 * 4
            fy = ((v + 0.5) * 2 + 6) / 24 * 4
            expected[v, u] = _bilinear(logits[0, 0].numpy(), fx, fy).argmax()
    np.testing.assert_array_equal(confusion, confusion_matrix(mask, expected, 3))
    assert confusion.sum() == mask.size


# -- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faceshapes_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("faceshapes_parts") / "fs"
    splits = {"train": 48, "val": 16, "test": 16}
    ensure_faceshapes(root, splits, samples_per_shard=32, image_size=32, num_workers=1, parts=True)
    return root


def test_eval_parsing_probe_end_to_end(tmp_path, tiny_ckpt, faceshapes_parts):
    cfg = compose_eval(
        "eval_parsing_probe",
        tmp_path,
        *eval_overrides(tmp_path, tiny_ckpt, "faceshapes_parsing", faceshapes_parts),
        "protocols.parsing_probe.epochs=2",
        "protocols.parsing_probe.examples=2",
    )
    metrics = run_parsing_probe(cfg)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "_examples" not in written and "_examples" in metrics
    assert written["protocol"] == "parsing_probe" and written["task"] == "parsing"
    assert written["n_train"] == 48 and written["n_test"] == 16 and written["selected"]["on"] == "val"
    assert written["label_size"] == 32 and written["blocks"] == [1, "final"]
    rescored = parsing_scores(np.asarray(written["confusion_matrix"]), written["labels"])
    assert rescored["summary"] == pytest.approx(written["summary"])
    assert written["n_pixels"] == 16 * 32 * 32  # every pixel of every test mask, once
    assert set(written["skipped"]) == {"train", "val", "test"}
    assert (tmp_path / "out" / "parsing_examples.png").is_file()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "mean F1 over the foreground classes" in report and "| hair |" in report


def test_eval_landmark_probe_end_to_end_with_a_held_out_part_of_train(tmp_path, tiny_ckpt, faceshapes_parts):
    cfg = compose_eval(
        "eval_landmark_probe",
        tmp_path,
        *eval_overrides(tmp_path, tiny_ckpt, "faceshapes_landmarks", faceshapes_parts),
        "benchmark.val_split=null",
        "protocols.landmark_probe.epochs=2",
        "protocols.landmark_probe.thresholds=[0.1,0.2]",
    )
    written = run_landmark_probe(cfg)
    assert written["selected"]["on"] == "held-out 20% of train (not refit)"
    assert written["n_train"] == 48 - round(0.2 * 48) and written["val_split"] is None
    assert set(written["summary"]) == {"nme", "fr_0.1", "auc_0.1", "fr_0.2", "auc_0.2"}
    assert written["summary"]["nme"] == pytest.approx(np.mean(written["per_face_nme"]))
    assert written["normaliser"] == "eye centres" and len(written["per_label"]) == 8
    assert (tmp_path / "out" / "landmark_examples.png").is_file()


def test_a_dense_probe_refuses_a_benchmark_without_dense_labels(tmp_path, tiny_ckpt, faceshapes_parts):
    cfg = compose_eval(
        "eval_parsing_probe",
        tmp_path,
        *eval_overrides(tmp_path, tiny_ckpt, "faceshapes", faceshapes_parts),
    )
    with pytest.raises(ValueError, match="needs a parsing benchmark; faceshapes/train is a attributes split"):
        run_parsing_probe(cfg)


def test_the_faceshapes_bench_probes_a_trained_tower_and_its_random_init(tmp_path, trained_demo):
    """bench/dense_probe_faceshapes.py at toy size: both probes on the demo model and on its
    architecture at a random initialisation, each row the figures of its own metrics.json. (At
    this size nothing is learned; the demo-scale figures are in docs/evaluation.md.)"""
    bench = runpy.run_path(
        str(ROOT / "bench" / "dense_probe_faceshapes.py"), run_name="dense_probe_faceshapes"
    )
    results = tmp_path / "results" / "dense_probe_faceshapes"
    bench["main"]([
        "--ckpt", str(trained_demo.ckpt), "--data", str(tmp_path / "data"), "--sizes", "24", "8", "8",
        "--image-size", "32", "--epochs", "1", "--out", str(tmp_path / "out"), "--results", str(results),
    ])  # fmt: skip
    report = json.loads(results.with_suffix(".json").read_text())
    assert [(r["task"], r["start"]) for r in report["runs"]] == [
        ("parsing", "pretrained"),
        ("parsing", "random init"),
        ("landmarks", "pretrained"),
        ("landmarks", "random init"),
    ]
    for row in report["runs"]:
        written = json.loads(
            (
                tmp_path / "out" / f"{row['task']}_{row['start'].replace(' ', '_')}" / "metrics.json"
            ).read_text()
        )
        assert written["checkpoint"] == row["start"] and written["n_test"] == 8
        assert all(row[k] == written["summary"][k] for k in written["summary"] if k in row)
    assert "| random init |" in results.with_suffix(".md").read_text()


def test_parsing_probe_without_a_validation_split_chooses_on_a_held_out_part_of_train(vit2, faceshapes_parts):
    reader = partial(read_faceshapes_dense, root=faceshapes_parts, task="parsing")
    benchmark = {"name": "faceshapes_parsing", "reader": reader, "train_split": "train", "test_split": "test"}
    probe = ParsingProbe(
        train_split="train", val_split=None, epochs=2, max_train=20, label_size=16, blocks=[2]
    )
    metrics = evaluate(vit2, benchmark, {"parsing_probe": probe}, progress=False)["parsing_probe"]
    assert metrics["selected"]["on"] == "held-out 20% of train (not refit)" and metrics["n_train"] == 16
    assert (
        len(metrics["selected"]["scores"]) == 2 and metrics["blocks"] == [2] and metrics["label_size"] == 16
    )
    assert metrics["n_pixels"] == 16 * 32 * 32  # scored at the masks' own 32 px, not at label_size
