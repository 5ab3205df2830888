"""`flip.query` and `flip-query`: zero-shot attribute questions about images."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import flip
from flip.cli.query import main as flip_query
from flip.data.faceshapes.generate import make_sample
from flip.evaluation.attribute_query import AttributeQuery
from flip.evaluation.prompts import DEFAULT_TEMPLATES, binary_prompts, choice_prompts
from flip.models import build_model

from .helpers import save_checkpoint


def _faces(tmp_path, count: int, seed: int = 0):
    """FaceShapes test faces written as JPEG files, with their attribute records."""
    folder = tmp_path / "faces"
    folder.mkdir(exist_ok=True)
    records = []
    for i in range(count):
        sample = make_sample("test", i, seed, image_size=48)
        (folder / f"{i:04d}.jpg").write_bytes(sample["jpg"])
        records.append(json.loads(sample["json"]))
    return folder, records


@torch.no_grad()
def _manual_binary(model, images, name):
    sides = binary_prompts(name)
    emb = []
    for side in ("positive", "negative"):
        prompts = [t.format(p) for t in DEFAULT_TEMPLATES for p in sides[side]]
        emb.append(F.normalize(model.encode_text(model.tokenize(prompts), normalize=True).mean(0), dim=-1))
    feats = model.encode_image(images, normalize=True)
    logits = model.logit_scale.exp() * torch.stack([feats @ emb[0], feats @ emb[1]], dim=1)
    return logits.softmax(dim=1)[:, 0]


def test_query_is_the_softmax_over_each_attributes_prompt_pair(tiny_model, tmp_path):
    folder, _ = _faces(tmp_path, 5)
    paths = sorted(folder.glob("*.jpg"))
    pils = [Image.open(p).convert("RGB") for p in paths]
    tensors = torch.stack([tiny_model.preprocess(p) for p in pils])
    probs = flip.query(tiny_model, paths, ["eyeglasses", "blond hair"])
    assert probs.shape == (5, 2) and ((probs > 0) & (probs < 1)).all()
    torch.testing.assert_close(probs[:, 0], _manual_binary(tiny_model, tensors, "eyeglasses"))
    torch.testing.assert_close(probs[:, 1], _manual_binary(tiny_model, tensors, "blond hair"))
    torch.testing.assert_close(
        flip.query(tiny_model, pils, ["eyeglasses", "blond hair"], batch_size=2), probs
    )
    torch.testing.assert_close(flip.query(tiny_model, tensors, ["eyeglasses", "blond hair"]), probs)
    torch.testing.assert_close(flip.query(tiny_model, str(paths[0]), ["eyeglasses", "blond hair"]), probs[:1])

    choices = flip.query(tiny_model, paths, choices=["happy", "sad", "angry"])
    torch.testing.assert_close(choices.sum(dim=1), torch.ones(5))
    with torch.no_grad():
        classes = torch.stack(
            [
                F.normalize(
                    tiny_model.encode_text(
                        tiny_model.tokenize(
                            [t.format(p) for t in DEFAULT_TEMPLATES for p in choice_prompts(c)]
                        ),
                        normalize=True,
                    ).mean(0),
                    dim=-1,
                )
                for c in ("happy", "sad", "angry")
            ]
        )
        expected = (
            tiny_model.logit_scale.exp() * tiny_model.encode_image(tensors, normalize=True) @ classes.T
        ).softmax(1)
    torch.testing.assert_close(choices, expected)
    with pytest.raises(ValueError, match="either attributes"):
        flip.query(tiny_model, paths, ["hat"], choices=["a", "b"])


def test_prompt_rules_for_free_phrases():
    assert binary_prompts("Wearing_Hat")["positive"] == ["wearing a hat"]
    assert binary_prompts("wearing a scarf") == {
        "positive": ["wearing a scarf"],
        "negative": ["not wearing a scarf", "without a scarf"],
    }
    assert binary_prompts("freckles") == {"positive": ["with freckles"], "negative": ["without freckles"]}
    assert choice_prompts("sleepy") == ["who looks sleepy"] and choice_prompts("red hair") == [
        "with red hair"
    ]


def test_flip_query_prints_one_json_line_per_image_in_order(tiny_model, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model, tmp_path / "tiny.ckpt")
    folder, _ = _faces(tmp_path, 4)
    (folder / "sub").mkdir()
    (folder / "sub" / "broken.jpg").write_bytes(b"not a jpeg")
    extra = tmp_path / "single.png"
    Image.new("RGB", (30, 30), (200, 180, 150)).save(extra)
    options = ["--attributes", "eyeglasses", "smiling", "--batch-size", "2", "--workers", "0"]
    code = flip_query(["--ckpt", str(ckpt), *options, "--", str(folder), str(extra)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected_order = [str(p) for p in sorted(folder.rglob("*.jpg"))] + [str(extra)]
    assert [r["image"] for r in lines] == expected_order and code == 1  # one unreadable image
    assert "error" in lines[4] and lines[4]["image"].endswith("broken.jpg")
    readable = [r for r in lines if "error" not in r]
    probs = flip.query(tiny_model, [r["image"] for r in readable], ["eyeglasses", "smiling"])
    got = torch.tensor([[r["probabilities"]["eyeglasses"], r["probabilities"]["smiling"]] for r in readable])
    torch.testing.assert_close(got, probs, atol=1e-5, rtol=0)

    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("templates: ['a face {}.']\ncalm: [looking calm]\nupset: [looking upset]\n")
    code = flip_query(
        ["--ckpt", str(ckpt), "--choices", "calm", "upset", "--prompts", str(prompts), "--", str(extra)]
    )
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    expected = flip.query(
        tiny_model,
        [extra],
        choices=["calm", "upset"],
        prompts={"calm": ["looking calm"], "upset": ["looking upset"]},
        templates=["a face {}."],
    )
    assert code == 0 and line["answer"] == ["calm", "upset"][int(expected.argmax())]
    assert line["probabilities"]["calm"] == pytest.approx(float(expected[0, 0]), abs=1e-5)


def _train_eyeglasses_model(steps: int = 300, seed: int = 0):
    """A tiny model whose image tower is trained (briefly, on 600 FaceShapes faces) to answer
    "eyeglasses" in its own prompt space: cross-entropy on the softmax over the positive and
    negative prompt ensembles, the decision `query` makes. The text tower stays as initialised.

    A contrastive run from scratch learns eyeglasses only after minutes (the demo); this keeps
    the test to seconds while the checkpoint still has to have learned eyeglasses from pixels
    to rank held-out faces.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    arch = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 8,
            "width": 32,
            "layers": 1,
            "head_width": 16,
            "pool_type": "avg",
        },
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model = build_model("flip-query-test", arch)
    question = AttributeQuery(model, ["eyeglasses"])
    pair = question.classifier.binary_embeddings[0]  # [2, D]: positive, negative ensembles
    images, labels = [], []
    for i in range(600):
        sample = make_sample("train", i, seed, image_size=48)
        images.append(model.preprocess(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
        labels.append(int(not json.loads(sample["json"])["eyeglasses"]))  # class 0 = positive side
    images, labels = torch.stack(images), torch.tensor(labels)
    optimizer = torch.optim.AdamW(model.clip.visual.parameters(), lr=3e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: a second thread only waits (and on a busy machine, long)
    try:
        model.train()
        for _ in range(steps):
            batch = [rng.randrange(len(images)) for _ in range(64)]
            features = model.encode_image(images[batch], normalize=True)
            loss = F.cross_entropy(model.logit_scale.exp() * features @ pair.T, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), arch


@pytest.mark.slow
def test_flip_query_gives_faces_with_eyeglasses_a_higher_probability(tmp_path, capsys):
    model, arch = _train_eyeglasses_model()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    hparams = {"model": {"name": "flip-query-test", "arch": arch, "pretrained": None}, "loss": {}}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, tmp_path / "trained.ckpt")
    folder, records = _faces(tmp_path, 200, seed=0)  # held-out: the test split of FaceShapes
    ckpt = str(tmp_path / "trained.ckpt")
    code = flip_query(["--ckpt", ckpt, "--attributes", "eyeglasses", "--workers", "0", "--", str(folder)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and [line["image"] for line in lines] == [str(p) for p in sorted(folder.glob("*.jpg"))]
    p = np.array([line["probabilities"]["eyeglasses"] for line in lines])
    glasses = np.array([r["eyeglasses"] for r in records])
    assert 40 < glasses.sum() < 160
    assert p[glasses].mean() > p[~glasses].mean() + 0.05, (p[glasses].mean(), p[~glasses].mean())
    assert flip.query(flip.load(ckpt), str(folder / "0000.jpg"), ["eyeglasses"]).item() == pytest.approx(
        p[0], abs=1e-5
    )


def test_the_old_model_query_method_names_its_replacement(tiny_model):
    """Models sit below evaluation and no longer import it: scripts calling model.query learn the new call."""
    with pytest.raises(AttributeError, match=r"flip\.query\(model, images, attributes\)"):
        tiny_model.query(["a.jpg"], ["eyeglasses"])
