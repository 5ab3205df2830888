"""Export: a trained demo model used without FLIP, by open_clip alone, onnxruntime and flip.load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

import flip
from flip.cli.export import main
from flip.evaluation.zeroshot import ZeroShotClassifier, expand
from flip.export import OpenClipExportError, export
from flip.models import build_model

from .helpers.bert import bert_arch, write_tiny_bert

# Runs in a fresh interpreter that imports open_clip and torch only, as a user without FLIP would.
OPEN_CLIP_ONLY = r"""
import json, sys
import torch, open_clip
from PIL import Image

folder, request, out = sys.argv[1:4]
request = json.loads(open(request).read())
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
model.eval()
images = torch.stack([preprocess(Image.open(path)) for path in request["images"]])
with torch.no_grad():
    image_features = model.encode_image(images, normalize=True)
    predictions = {}
    for question, classes in request["questions"].items():
        # CLIP prompt ensembling: mean of the normalised prompt embeddings, renormalised
        embeddings = [model.encode_text(tokenizer(prompts), normalize=True).mean(0) for prompts in classes]
        weights = torch.nn.functional.normalize(torch.stack(embeddings), dim=-1)
        predictions[question] = (model.logit_scale.exp() * image_features @ weights.T).argmax(-1)
    text_features = model.encode_text(tokenizer(request["texts"]), normalize=True)
torch.save({
    "image_features": image_features, "text_features": text_features, "tokens": tokenizer(request["texts"]),
    "predictions": predictions, "flip_modules": sorted(m for m in sys.modules if m.split(".")[0] == "flip"),
}, out)
"""


@pytest.fixture(scope="module")
def demo(trained_demo, tmp_path_factory):
    """The demo recipe (CLIP + FILIP on FaceShapes) at test size: a real train.py checkpoint."""
    cfg = trained_demo.cfg
    images = tmp_path_factory.mktemp("demo_images")
    shard = sorted((trained_demo.faceshapes / "test").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        for member in [m for m in tar.getmembers() if m.name.endswith(".jpg")][:24]:
            (images / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return {
        "ckpt": trained_demo.ckpt,
        "eval": OmegaConf.to_container(cfg.eval.benchmark, resolve=True),
        "images": sorted(str(p) for p in images.glob("*.jpg")),
    }


@pytest.fixture(scope="module")
def open_clip_export(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "open_clip"
    assert main(["--ckpt", str(demo["ckpt"]), "--format", "open_clip", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_open_clip_export_holds_exactly_the_trained_weights(demo, open_clip_export):
    assert sorted(p.name for p in open_clip_export.iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    trained = torch.load(demo["ckpt"], weights_only=True)["state_dict"]
    trained = {key[len("model.clip.") :]: value for key, value in trained.items()}
    exported = load_file(str(open_clip_export / "open_clip_model.safetensors"))
    assert set(exported) == set(trained)
    assert all(torch.equal(exported[key], trained[key]) for key in trained)
    config = json.loads((open_clip_export / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32  # the tiny test towers, not a built-in
    assert config["preprocess_cfg"]["size"] == [32, 32]


@pytest.mark.slow
def test_open_clip_alone_gives_the_same_embeddings_and_zero_shot_predictions(
    demo, open_clip_export, tmp_path
):
    eval_cfg = demo["eval"]
    questions = {
        name: [expand(eval_cfg["templates"], sides[side]) for side in ("positive", "negative")]
        for name, sides in eval_cfg["binary"].items()
    }
    questions |= {
        name: [expand(eval_cfg["templates"], phrases) for phrases in classes.values()]
        for name, classes in eval_cfg["multiclass"].items()
    }
    texts = [prompt for classes in questions.values() for prompts in classes for prompt in prompts]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"images": demo["images"], "questions": questions, "texts": texts}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", OPEN_CLIP_ONLY, str(open_clip_export), str(request), str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    assert theirs["flip_modules"] == []

    model = flip.load(demo["ckpt"])
    images = torch.stack([model.preprocess(Image.open(path)) for path in demo["images"]])
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(model.tokenize(texts), normalize=True)
    assert torch.equal(theirs["tokens"], model.tokenize(texts))
    assert (theirs["image_features"] - image_features).abs().max() <= 1e-5
    assert (theirs["text_features"] - text_features).abs().max() <= 1e-5

    # FLIP's own zero-shot evaluation code decides every question as open_clip did
    classifier = ZeroShotClassifier.from_prompts(
        model, eval_cfg["templates"], eval_cfg["binary"], eval_cfg["multiclass"]
    )
    ours = classifier.predict(image_features)
    for index, name in enumerate(eval_cfg["binary"]):
        assert torch.equal(theirs["predictions"][name], (ours["binary"][:, index] < 0.5).long()), name
    for name in eval_cfg["multiclass"]:
        assert torch.equal(theirs["predictions"][name], ours[name].argmax(-1)), name
    assert len({tuple(p.tolist()) for p in theirs["predictions"].values()}) > 1  # not one constant answer


@pytest.mark.slow
def test_onnx_graphs_match_pytorch_at_any_batch_size(demo, tmp_path):
    out = tmp_path / "onnx"
    assert main(["--ckpt", str(demo["ckpt"]), "--format", "onnx", "--out", str(out)]) == 0
    config = json.loads((out / "onnx_config.json").read_text())
    model = flip.load(demo["ckpt"])
    image_session = onnxruntime.InferenceSession(str(out / config["image_encoder"]["file"]))
    text_session = onnxruntime.InferenceSession(str(out / config["text_encoder"]["file"]))
    assert isinstance(image_session.get_inputs()[0].shape[0], str)  # a symbolic, dynamic batch
    assert isinstance(text_session.get_inputs()[0].shape[0], str)
    assert config["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()))

    for batch in (1, 7):
        images = torch.stack([model.preprocess(Image.open(path)) for path in demo["images"][:batch]])
        text = model.tokenize(
            [f"a photo of a person with {c} hair" for c in ["red", "black", "gray"] * 3][:batch]
        )
        (image_features,) = image_session.run(None, {"image": images.numpy()})
        (text_features,) = text_session.run(None, {"text": text.numpy()})
        with torch.no_grad():
            assert np.abs(image_features - model.encode_image(images).numpy()).max() <= 1e-4
            assert np.abs(text_features - model.encode_text(text).numpy()).max() <= 1e-4
    assert max(config["check"]["max_abs_difference"].values()) <= 1e-4


@pytest.mark.slow
def test_safetensors_export_is_read_by_flip_load_bit_for_bit(demo, open_clip_export, tmp_path):
    out = tmp_path / "st"
    assert main(["--ckpt", str(demo["ckpt"]), "--format", "safetensors", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["flip_config.json", "model.safetensors"]
    reference = flip.load(demo["ckpt"]).state_dict()
    for path in (out, out / "model.safetensors", open_clip_export):  # and the open_clip folder as well
        loaded = flip.load(path)
        assert not loaded.training
        assert set(loaded.state_dict()) == set(reference)
        assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items()), path


def test_flip_load_names_what_it_accepts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"neither flip_config.json nor open_clip_config.json.*Lightning"):
        flip.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        flip.load(tmp_path / "missing.ckpt")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "latest").write_text("global_step4")
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO checkpoint folder.*flip-zero-to-fp32"):
        flip.load(tmp_path / "zero")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "open_clip_config.json").write_text('{"model_cfg": {}}')
    with pytest.raises(FileNotFoundError, match=r"has open_clip_config\.json but no weights"):
        flip.load(tmp_path / "no_weights")


@pytest.mark.slow
def test_export_never_overwrites_by_accident_and_leaves_nothing_when_it_fails(demo, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["--ckpt", str(demo["ckpt"]), "--format", "safetensors", "--out", str(out)]
    assert main(args) == 2
    assert "already holds files" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main([*args, "--overwrite"]) == 2  # --overwrite replaces only a previous export
    assert "not a previous export" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert main(args) == 0 and main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["flip_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no staging folders left behind

    assert (
        main(["--ckpt", str(tmp_path / "nothing.ckpt"), "--format", "onnx", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ckpt", str(demo["ckpt"]), "--format", "torchscript", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'torchscript'" in capsys.readouterr().err


def test_a_hugging_face_text_tower_cannot_go_to_open_clip_and_the_error_says_why(tmp_path):
    model = build_model("flip-test-bert", bert_arch(write_tiny_bert(tmp_path / "bert")))
    with pytest.raises(
        OpenClipExportError, match=r"Hugging Face text tower.*hf_model_name=.*bert.*AutoConfig"
    ):
        export(model, tmp_path / "oc", "open_clip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]  # nothing half-written

    export(model, tmp_path / "st", "safetensors")  # the FLIP format takes it
    loaded = flip.load(tmp_path / "st")
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())
