"""model.image_stem: a convolutional stem keeps the ViT's token grid but sees across patch borders;
stems that cannot fit are refused; train.py trains it, flip.load rebuilds it, and the exports
that can hold it do (open_clip's cannot, and says so)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import flip
from flip.export import OpenClipExportError, export
from flip.models import build_model
from flip.models.image_stem import ConvStem
from flip.training.finetune.resolution import resized
from flip.training.run import train

from .helpers import SHARDS_BASE, TINY_ARCH, compose_train_config, write_caption_shards

STEM = {"channels": [8, 16, 32]}  # stride 8: the tiny test ViT's patch size
RESNET = {**TINY_ARCH, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}}


def test_the_stem_keeps_the_token_grid_and_sees_across_patch_borders(tiny_model):
    plain, stemmed = tiny_model, build_model("flip-test-tiny", TINY_ARCH, image_stem=STEM).eval()
    assert isinstance(stemmed.clip.visual.conv1, ConvStem) and stemmed.config["image_stem"] == STEM
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert stemmed._image_with_tokens(images)[1].shape == plain._image_with_tokens(images)[1].shape
        # a change in the top-right pixel of the first 8x8 patch: the patch projection moves that
        # patch's embedding only; the stem's 3x3 convolutions reach the next patch's to the right too
        changed = images.clone()
        changed[:, :, 0, 7] += 1.0
        for model, moved in ((plain, [[True, False]]), (stemmed, [[True, True]])):
            before, after = model.clip.visual.conv1(images), model.clip.visual.conv1(changed)
            assert before.shape == (2, 32, 4, 4)
            differs = (before - after).abs().amax(dim=(0, 1)) > 1e-6
            assert differs[:1, :2].tolist() == moved
            assert not differs[1:].any() and not differs[:, 2:].any()


def test_the_stem_computes_channels_last_what_the_usual_layout_computes():
    torch.manual_seed(0)
    stem = ConvStem([8, 16, 32], 32).train()
    twin = ConvStem([8, 16, 32], 32).train()
    twin.load_state_dict(stem.state_dict())
    images = torch.randn(6, 3, 32, 32)
    out = stem(images)
    expected = torch.nn.Sequential.forward(twin, images)  # every layer in the usual (NCHW) layout
    assert out.is_contiguous(memory_format=torch.channels_last) and expected.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sin().sum().backward()
    expected.sin().sum().backward()
    for (name, p), q in zip(stem.named_parameters(), twin.parameters(), strict=True):
        assert p.grad.is_contiguous()  # checkpoints and exports see the usual layout
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)
    for key, value in stem.state_dict().items():  # the batch norms' statistics too
        torch.testing.assert_close(value, twin.state_dict()[key], msg=key)


def test_a_fine_tune_at_another_input_size_keeps_the_stem_and_its_weights():
    model = build_model("flip-test-tiny", TINY_ARCH, image_stem=STEM).eval()
    bigger = resized(model, 48).eval()
    assert isinstance(bigger.clip.visual.conv1, ConvStem) and bigger.config["image_stem"] == STEM
    for key, value in model.clip.visual.conv1.state_dict().items():
        assert torch.equal(bigger.clip.visual.conv1.state_dict()[key], value), key
    with torch.no_grad():
        assert bigger._image_with_tokens(torch.randn(2, 3, 48, 48))[1].shape == (2, 36, 32)  # a 6x6 grid


@pytest.mark.parametrize("training", [True, False])
def test_the_stem_runs_with_parameters_cast_and_statistics_left_in_float32(training):
    """What DeepSpeed 0.19's bf16 mode does to a module (parameters cast, buffers kept): torch's
    batch norm refuses bf16 weights beside float32 statistics; the stem normalises in float32."""
    torch.manual_seed(0)
    reference = ConvStem([8, 16], 32).train(training)
    for module in reference.modules():  # statistics away from their initial 0 and 1
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.5, 0.5)
    cast = ConvStem([8, 16], 32).train(training)
    cast.load_state_dict(reference.state_dict())
    for parameter in cast.parameters():
        parameter.data = parameter.data.bfloat16()
    images = torch.randn(4, 3, 16, 16)
    before = cast[1].running_mean.clone()

    out = cast(images.bfloat16())
    out.float().square().mean().backward()
    expected = reference(images)
    expected.square().mean().backward()

    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), expected, atol=0.1, rtol=0.05)
    first_cast, first_reference = cast[0].weight.grad, reference[0].weight.grad
    assert first_cast.dtype == torch.bfloat16
    assert torch.allclose(first_cast.float(), first_reference, atol=0.02, rtol=0.1)
    for name, value in reference.state_dict().items():
        if "running" in name or "num_batches" in name:
            kept = cast.state_dict()[name]
            assert kept.dtype == value.dtype  # float32 statistics stay float32
            assert torch.allclose(kept.float(), value.float(), atol=0.02), name
    # training updates the statistics (by the momentum step the reference took), eval leaves them
    assert int(cast[1].num_batches_tracked) == int(training)
    assert torch.equal(cast[1].running_mean, before) is not training


@pytest.mark.parametrize(
    ("stem", "arch", "kwargs", "message"),
    [
        ({"channels": [8, 16]}, TINY_ARCH, {}, "stride 4, but the ViT's patch size is 8x8: give 3"),
        ({"channels": []}, TINY_ARCH, {}, "expected {channels: [c1, c2, ...]}"),
        ({"channels": [8, 0, 32]}, TINY_ARCH, {}, "one positive channel count"),
        ({"channel": [8, 16, 32]}, TINY_ARCH, {}, "expected {channels"),
        ([8, 16, 32], TINY_ARCH, {}, "expected {channels"),
        ({"channels": [8, "16", 32]}, TINY_ARCH, {}, "one positive channel count"),
        (STEM, RESNET, {}, "this image tower is ModifiedResNet"),
        # refused before anything is fetched: the stem would throw away the weights' patch projection
        (STEM, None, {"pretrained": "openai"}, "model.pretrained='openai'"),
    ],
)
def test_stems_that_cannot_fit_are_refused_naming_what_would(stem, arch, kwargs, message):
    name = "ViT-B-32" if arch is None else "flip-test-stem-refused"
    with pytest.raises(ValueError) as error:
        build_model(name, arch, image_stem=stem, **kwargs)
    assert message in str(error.value)


@pytest.mark.slow
def test_train_py_trains_the_stem_and_flip_load_and_safetensors_rebuild_it(tmp_path):
    shards = Path(write_caption_shards(tmp_path / "shards", count=64, per_shard=32)[0]).parent
    overrides = [
        f"data.train_shards={shards}", "data.batch_size=8", "data.num_workers=0",
        "data.samples_per_epoch=1000", "trainer.max_steps=3", "trainer.val_check_interval=null",
        "model.image_stem={channels:[8,16,32]}",
    ]  # fmt: skip
    train(compose_train_config(tmp_path, overrides, SHARDS_BASE))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["hyper_parameters"]["model"]["image_stem"] == STEM
    model = flip.load(last).eval()
    assert isinstance(model.clip.visual.conv1, ConvStem)
    # the batch-norm statistics were tracked while training and came back with the weights
    stats = saved["state_dict"]["model.clip.visual.conv1.1.running_mean"]
    assert stats.abs().sum() > 0 and torch.equal(model.clip.visual.conv1[1].running_mean, stats)

    images = torch.randn(3, 3, 32, 32)
    export(model, tmp_path / "safetensors", "safetensors")
    with torch.no_grad():
        reloaded = flip.load(tmp_path / "safetensors").eval()
        torch.testing.assert_close(reloaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)
    # ONNX traces the stem like any module; the export compares onnxruntime with PyTorch itself
    written = export(model, tmp_path / "onnx", "onnx")
    assert {"image_encoder.onnx", "text_encoder.onnx"} <= {p.name for p in (tmp_path / "onnx").iterdir()}
    differences = written["max_abs_difference"]
    assert "image_batch_3" in differences and max(differences.values()) <= 1e-4
    with pytest.raises(OpenClipExportError, match=r"model\.image_stem=.*--format safetensors"):
        export(model, tmp_path / "open_clip", "open_clip")
    assert not (tmp_path / "open_clip").exists()
