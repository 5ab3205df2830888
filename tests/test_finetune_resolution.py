"""Fine-tuning at another input size (finetune.py image_size=): the re-sized tower's position
embedding is the bicubic interpolation open_clip's resize_pos_embed makes and every other weight
is the original's; a parsing fine-tune at the new size trains, validates, exports and evaluates
there (labels, kept outputs, the exported model and its transforms), resumes from its checkpoint,
and the exported model answers as the one in memory; sizes no tower or this tower takes fail
before any work, naming the value."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed
from PIL import Image

import flip
from flip.benchmarks import read_faceshapes_dense
from flip.evaluation.dense_features import DenseCrops
from flip.export import export
from flip.models import build_model
from flip.models.heads import image_features
from flip.training.finetune import run as finetune_run
from flip.training.finetune.resolution import resized
from flip.training.finetune.run import finetune

from .helpers import compose_finetune_config

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "pool_type": "avg"}
TEXT = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
POS = "clip.visual.positional_embedding"


def test_the_resized_tower_interpolates_its_position_embedding_as_open_clip_and_keeps_every_other_weight():
    torch.manual_seed(0)
    model = build_model("flip-test-resize", {"embed_dim": 32, "vision_cfg": VISION, "text_cfg": TEXT})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = resized(model, 48)
    assert new.clip.visual.image_size == (48, 48) and new.clip.visual.grid_size == (6, 6)
    assert new.config == {**model.config, "image_size": 48}
    after = new.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before if k != POS)
    # the class token's row as it was, the 4x4 grid's rows interpolated to 6x6 (bicubic, antialiased)
    old = before[POS]
    grid = old[1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True, align_corners=False)
    assert torch.equal(after[POS][0], old[0])
    assert torch.allclose(after[POS][1:], expected.permute(0, 2, 3, 1).reshape(36, 32), atol=1e-6)
    open_clips = {"visual.positional_embedding": old.clone()}
    resize_pos_embed(open_clips, new.clip)
    assert torch.equal(after[POS], open_clips["visual.positional_embedding"])
    # the transforms follow; the tower runs at the new size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    assert new.preprocess(image).shape == new.preprocess_train(image).shape == (3, 48, 48)
    assert new.encode_image(new.preprocess(image)[None]).shape == (1, 32)

    # at its own size (or null) the model is the same object, its weights untouched
    for size in (32, None):
        assert resized(model, size) is model
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    with pytest.raises(
        ValueError, match=r"image_size=50: the tower's patch size 8 does not divide it \(e\.g\. 48 or 56"
    ):
        resized(model, 50)
    with pytest.raises(ValueError, match=r"image_size=-8: not a positive whole number"):
        resized(model, -8)
    timm = build_model(
        "flip-test-resize-timm",
        {"embed_dim": 32, "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                                         "image_size": 32}, "text_cfg": TEXT},
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"image_size=64: the image tower is a TimmModel, not open_clip's Vision"
    ):
        resized(timm, 64)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["image_size=44"], r"image_size=44: the tower's patch size 8 does not divide it \(e\.g\. 40 or 48,"),
        (["image_size=0"], r"image_size=0: not a positive whole number of pixels"),
        (["image_size=1.5"], r"image_size=1.5"),
        (["image_size=64", "+model.arch.vision_cfg.timm_model_name=convnext_atto"],
         r"image_size=64: the image tower is timm's 'convnext_atto'.*image_size is null \(the tower's own"),
    ],
)  # fmt: skip
def test_a_size_the_tower_cannot_take_fails_before_any_work_naming_it(tmp_path, overrides, error):
    with pytest.raises(ValueError, match=error):
        finetune(compose_finetune_config(tmp_path, overrides))
    assert not (tmp_path / "run").exists()


def test_a_parsing_fine_tune_at_a_new_size_trains_resumes_exports_and_evaluates_there(
    faceshapes_parts, tmp_path, monkeypatch
):
    finals = []

    def keep_final(cfg, benchmark, final, suffix, n_train):
        finals.append(final)
        return export_and_evaluate(cfg, benchmark, final, suffix, n_train)

    export_and_evaluate = finetune_run._export_and_evaluate
    monkeypatch.setattr(finetune_run, "_export_and_evaluate", keep_final)
    overrides = [
        "task=parsing", "benchmark=faceshapes_parsing", f"benchmark.root={faceshapes_parts}", "image_size=48",
        "task.head.channels=8", "model.arch.vision_cfg.layers=2", "task.head.blocks=[1,2]",
    ]  # fmt: skip
    finetune(compose_finetune_config(tmp_path, [*overrides, "trainer.max_steps=2", "evaluate=false"]))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert first["global_step"] == 2 and first["state_dict"]["model." + POS].shape == (37, 32)
    # resumed at the new size: the checkpoint's 6x6 grid loads into the re-sized tower
    finetune(compose_finetune_config(tmp_path, [*overrides, "trainer.max_steps=3", "ckpt_path=auto"]))
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 3 and resumed["hyper_parameters"]["model"]["image_size"] == 48
    assert resumed["hyper_parameters"]["task"]["label_size"] == 48  # null: the new input size

    final = finals[-1]
    test = read_faceshapes_dense(faceshapes_parts, "test", "parsing")
    crops = DenseCrops(test.images, test.dense)
    batch = torch.stack([final.model.preprocess(crops.load(i)) for i in range(len(test))])
    assert batch.shape == (len(test), 3, 48, 48)
    assert final.task.targets(test).shape == (len(test), 48, 48)
    final.eval()
    with torch.no_grad():
        features = image_features(final.model.clip.visual, batch, final.head.blocks)
        assert features.blocks[2].shape == (len(test), 32, 6, 6)  # the 6x6 token grid of 48 px
        kept = final.task.kept(final(batch))
    assert kept.shape == (len(test), 48, 48)

    exported = flip.load(tmp_path / "run" / "model")
    assert exported.config["image_size"] == 48 and exported.clip.visual.image_size == (48, 48)
    assert torch.equal(torch.stack([exported.preprocess(crops.load(i)) for i in range(len(test))]), batch)
    with torch.no_grad():
        again = image_features(exported.clip.visual, batch, final.head.blocks)
        for block in (1, 2):
            assert torch.allclose(again.blocks[block], features.blocks[block], atol=1e-5)
        assert torch.allclose(exported.encode_image(batch), final.model.encode_image(batch), atol=1e-5)
        logits = final.head(again)

    # the run's evaluation scored at 48 px, with what the exported model and head predict
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["label_size"] == 48 and metrics["n_pixels"] == len(test) * 48 * 48
    predicted = final.task.kept(logits).numpy()
    direct = np.zeros((len(test.label_names),) * 2, dtype=int)
    np.add.at(direct, (final.task.targets(test).numpy().ravel(), predicted.ravel()), 1)
    assert np.array_equal(np.asarray(metrics["confusion_matrix"]), direct)


def test_a_resized_model_exports_an_open_clip_folder_that_open_clip_builds_at_its_size(tmp_path):
    torch.manual_seed(0)
    model = resized(
        build_model("flip-test-resize", {"embed_dim": 32, "vision_cfg": VISION, "text_cfg": TEXT}), 48
    )
    export(model, tmp_path / "oc", "open_clip")  # loads it back with open_clip: the same weights and inputs
    config = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 48 and config["preprocess_cfg"]["size"] == [
        48,
        48,
    ]
    loaded = flip.load(tmp_path / "oc")
    assert loaded.clip.visual.image_size == (48, 48)
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loaded.encode_image(images), model.eval().encode_image(images), atol=1e-5)
