"""Dense fine-tuning: the FPN/UPer head's pyramid and gradients, its fit of a synthetic
segmentation on fixed features, and finetune.py task=parsing / task=landmarks end to end on
FaceShapes with parts (metrics.json through the evaluation path, labelled by adaptation; the
landmark NME equal to a direct computation in image pixels with the exported files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import flip
from flip.benchmarks import read_faceshapes_dense
from flip.benchmarks.dense import points_from_crop
from flip.evaluation.dense_features import DenseCrops, label_maps
from flip.evaluation.dense_metrics import nme_per_face
from flip.models import build_model
from flip.models.dense_heads import FPNHead, HeatmapPoints, LinearMapHead
from flip.models.heads import ImageFeatures, image_features
from flip.training.finetune.run import finetune

from .helpers import compose_finetune_config

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16, "pool_type": "avg"}
TEXT = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TWO_BLOCKS = ["model.arch.vision_cfg.layers=2", "task.head.blocks=[1,2]"]


def test_fpn_head_builds_a_pyramid_and_each_chosen_block_gets_gradient():
    torch.manual_seed(0)
    head = FPNHead(width=16, out_channels=5, blocks=[2, 4, 6], channels=8)
    maps = {b: torch.randn(2, 16, 4, 6, requires_grad=True) for b in (2, 4, 6, 7)}
    out = head(ImageFeatures(torch.zeros(2, 8), maps))
    assert out.shape == (2, 5, 16, 24)  # 4x the token grid, whatever its aspect
    assert head.factors == [4, 2, 1]
    out.square().mean().backward()
    for block in (2, 4, 6):
        assert maps[block].grad is not None and maps[block].grad.abs().sum() > 0, block
    assert maps[7].grad is None  # not chosen, not read
    with pytest.raises(ValueError, match=r"not \[3\]"):
        FPNHead(16, 5, blocks=[2, 3])(ImageFeatures(torch.zeros(2, 8), maps))
    with pytest.raises(ValueError, match="1-based"):
        FPNHead(16, 5, blocks=[0, 2])

    # through a tower: the chosen blocks' weights learn, the ones after them get nothing
    model = build_model("flip-test-dense-fpn", {"embed_dim": 32, "vision_cfg": VISION, "text_cfg": TEXT})
    visual = model.clip.visual
    head = FPNHead(32, 3, blocks=[1, 2], channels=8)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = head(image_features(visual, images, head.blocks))
    assert out.shape == (2, 3, 16, 16)
    out.square().mean().backward()
    grads = [[p.grad for p in block.parameters()] for block in visual.transformer.resblocks]
    for i in (0, 1):
        assert any(g is not None and g.abs().sum() > 0 for g in grads[i]), f"block {i + 1}"
    assert all(g is None for g in grads[2])


def test_fpn_head_fits_a_segmentation_of_fixed_features_far_above_chance():
    """Each pixel's class is the sign of the sum of one channel of each block at its token: a head
    that learned nothing stays near 50%, one that read a single block near 75% (the sign of one
    of two independent normals agrees with their sum's 3 times in 4), one that misplaced its
    upsampling lower still."""
    gen = torch.Generator().manual_seed(0)

    def sample(n: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        maps = {b: 0.3 * torch.randn(n, 8, 4, 4, generator=gen) for b in (1, 3)}
        maps[1][:, 0] = torch.randn(n, 4, 4, generator=gen)
        maps[3][:, 1] = torch.randn(n, 4, 4, generator=gen)
        tokens = (maps[1][:, 0] + maps[3][:, 1] > 0).long()  # [n, 4, 4]
        return maps, tokens.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # [n, 16, 16]

    torch.manual_seed(0)
    head = FPNHead(width=8, out_channels=2, blocks=[1, 3], channels=8)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    train_maps, train_labels = sample(512)
    for _ in range(100):
        rows = torch.randint(0, 512, (16,), generator=gen)
        batch = ImageFeatures(torch.zeros(1), {b: m[rows] for b, m in train_maps.items()})
        loss = F.cross_entropy(head(batch), train_labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_maps, test_labels = sample(64)
    with torch.no_grad():
        predicted = head(ImageFeatures(torch.zeros(1), test_maps)).argmax(dim=1)
    majority = max(float(test_labels.float().mean()), 1 - float(test_labels.float().mean()))
    accuracy = float((predicted == test_labels).float().mean())
    assert majority < 0.55 and accuracy > 0.82, (accuracy, majority)


def test_finetune_parsing_with_lora_and_the_fpn_head_writes_labelled_dense_metrics(
    faceshapes_parts, tmp_path
):
    cfg = compose_finetune_config(
        tmp_path,
        ["task=parsing", "benchmark=faceshapes_parsing", f"benchmark.root={faceshapes_parts}", "adapt=lora",
         "adapt.rank=2", "trainer.max_steps=3", "task.head.channels=8", "task.label_size=24", *TWO_BLOCKS],
    )  # fmt: skip
    results = finetune(cfg)
    assert "val/mean_f1" in results["train"]  # validated after the first epoch (2 steps)
    out = tmp_path / "run" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    test = read_faceshapes_dense(faceshapes_parts, "test", "parsing")
    assert (metrics["protocol"], metrics["task"], metrics["weights"]) == ("finetune", "parsing", "raw")
    assert metrics["adaptation"] == {"method": "lora", "rank": 2, "label": "LoRA r=2"}
    assert set(metrics["summary"]) == {"mean_f1", "miou", "pixel_accuracy"}
    assert list(metrics["per_label"]) == metrics["labels"] == list(test.label_names)
    assert metrics["blocks"] == [1, 2] and metrics["head"].startswith("FPN/UPer")
    confusion = np.asarray(metrics["confusion_matrix"])
    assert confusion.sum() == metrics["n_pixels"] == len(test) * 24 * 24  # the crops cover the images
    # the same confusion matrix, from the exported model and head, through a direct computation
    model = flip.load(tmp_path / "run" / "model")
    head = FPNHead(32, len(test.label_names), [1, 2], channels=8)
    head.load_state_dict(load_file(str(tmp_path / "run" / "head.safetensors")))
    crops = DenseCrops(test.images, test.dense)
    with torch.no_grad():
        batch = torch.stack([model.preprocess(crops.load(i)) for i in range(len(test))])
        logits = head.eval()(image_features(model.clip.visual, batch, head.blocks))
    predicted = F.interpolate(logits, size=24, mode="bilinear").argmax(dim=1).numpy()
    truth = label_maps(test, 24)
    direct = np.zeros_like(confusion)
    np.add.at(direct, (truth.ravel(), predicted.ravel()), 1)  # FaceShapes' crops hold no padding
    assert np.array_equal(confusion, direct)
    f1 = 2 * np.diag(direct) / (direct.sum(0) + direct.sum(1))
    foreground = [f for f, name in zip(f1, test.label_names, strict=True) if name != "background" and f == f]
    assert metrics["summary"]["mean_f1"] == pytest.approx(np.mean(foreground))
    assert "_examples" not in metrics
    assert (out / "parsing_examples.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "adaptation: LoRA r=2" in report and "F1" in report
    assert json.loads(load_file_metadata(tmp_path / "run" / "head.safetensors")["task"])["label_size"] == 24


def load_file_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_finetune_landmarks_frozen_nme_equals_a_direct_computation_in_image_pixels(
    faceshapes_parts, tmp_path
):
    cfg = compose_finetune_config(
        tmp_path,
        ["task=landmarks", "benchmark=faceshapes_landmarks", f"benchmark.root={faceshapes_parts}",
         "adapt=frozen", "trainer.max_steps=4", "optim.lr=0.05", *TWO_BLOCKS],
    )  # fmt: skip
    finetune(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["adaptation"] == {"method": "frozen", "label": "frozen"}
    assert set(metrics["summary"]) == {"nme", "fr_0.1", "auc_0.1"}
    assert metrics["task"] == "landmarks" and metrics["normaliser"] and metrics["thresholds"] == [0.1]
    assert (run / "eval" / "landmark_examples.png").stat().st_size > 0

    test = read_faceshapes_dense(faceshapes_parts, "test", "landmarks")
    model = flip.load(run / "model")
    head = HeatmapPoints(LinearMapHead(32, len(test.label_names), [1, 2]), upscale=4)
    head.load_state_dict(load_file(str(run / "head.safetensors")))
    crops = DenseCrops(test.images, test.dense)
    with torch.no_grad():
        batch = torch.stack([model.preprocess(crops.load(i)) for i in range(len(test))])
        fractions = head(image_features(model.clip.visual, batch, head.blocks)).double().numpy()
    pixels = np.stack([points_from_crop(f, crops.crop(i)) for i, f in enumerate(fractions)])
    per_face = nme_per_face(pixels, test.dense.points, test.dense.norms)
    assert metrics["summary"]["nme"] == pytest.approx(per_face.mean(), rel=1e-4)
    assert metrics["summary"]["fr_0.1"] == pytest.approx((per_face > 0.1).mean())
