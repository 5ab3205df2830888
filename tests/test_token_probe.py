"""The token probe: its vectors against open_clip's own modules, its cache, its heads, losses and
epoch selection against independent computations, and eval/token_probe.py end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import mean_absolute_error

from flip.benchmarks import CELEBA_ATTRIBUTES
from flip.benchmarks.base import ImageFiles, LabelledSplit, PixelArrays
from flip.evaluation import token_head, token_probe
from flip.evaluation.features import FeatureCache, SplitFeatures
from flip.evaluation.linear_probe import LinearProbe
from flip.evaluation.probe_targets import ProbeTargets
from flip.evaluation.token_features import split_token_vectors
from flip.evaluation.token_head import (
    ProbeSettings,
    TokenHead,
    batch_gradients,
    fit_token_probe,
    normalize_vectors_,
    predict,
)
from flip.evaluation.token_probe import AS_PUBLISHED, TokenProbe
from flip.models import FlipModel, build_model
from flip.models.probe_tokens import default_probe_blocks, resolve_probe_blocks

from .helpers import compose_eval, eval_overrides
from .helpers.evaluation import run_token_probe
from .test_lfwa_layouts import TEST as LFWA_TEST
from .test_lfwa_layouts import TRAIN as LFWA_TRAIN
from .test_lfwa_layouts import _values, write_celeba_text, write_flip_csv
from .test_prepare_celeba import write_celeba

# -- the vectors -------------------------------------------------------------------------------


def test_default_blocks_are_flips_at_the_same_relative_depth():
    assert default_probe_blocks(12) == [4, 6, 8, "final"]
    assert default_probe_blocks(24) == [8, 12, 16, "final"]
    assert default_probe_blocks(3) == [1, 2, "final"]  # 1.5 and 2 both land on block 2: read once
    with pytest.raises(ValueError, match=r"1-based block numbers 1\.\.12"):
        resolve_probe_blocks([0, 4], 12)
    with pytest.raises(ValueError, match="listed twice"):
        resolve_probe_blocks([4, 4], 12)


@pytest.fixture(scope="module")
def vit3() -> FlipModel:
    """A 3-block ViT that pools by averaging its normed patch tokens (as conf/model/tiny.yaml)."""
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "width": 32,
        "layers": 3,
        "head_width": 16,
        "pool_type": "avg",
    }
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    return build_model(
        "flip-test-token-vit", {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}
    ).eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_vectors_equal_open_clips_own_intermediates(vit3, batch_first, monkeypatch):
    visual = vit3.clip.visual
    monkeypatch.setattr(visual.transformer, "batch_first", batch_first)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = vit3.token_probe_vectors(images, [1, 2, "final"])
        # open_clip's own path: its forward_intermediates over the same embeddings, its ln_post
        _, hidden = visual.transformer.forward_intermediates(visual._embeds(images), indices=[0, 1, 2])
        expected = []
        for h in (hidden[0], hidden[1], visual.ln_post(hidden[2])):
            expected += [h[:, 0], h[:, 1:].mean(1), h[:, 1:].max(1).values]
        pooled = vit3.encode_image(images)
    assert ours.shape == (3, 9, visual.transformer.width)
    torch.testing.assert_close(ours, torch.stack(expected, 1), rtol=1e-5, atol=1e-5)
    # the tower pools by averaging the normed patch tokens: the final mean is its embedding
    torch.testing.assert_close(ours[:, 7] @ visual.proj, pooled, rtol=1e-4, atol=1e-5)


def test_a_tower_without_tokens_fails_naming_what_works():
    arch = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    resnet = build_model("flip-test-resnet", arch=arch)
    with pytest.raises(ValueError, match=r"VisionTransformer image tower .*ModifiedResNet.*linear_probe"):
        resnet.token_probe_vectors(torch.zeros(1, 3, 64, 64))


def _image_split(tmp_path, n: int = 5) -> LabelledSplit:
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(path)
        paths.append(str(path))
    targets = (np.arange(n)[:, None] % 2).astype(np.int8)
    return LabelledSplit("tiny", "test", "attributes", ["a"], targets, ImageFiles(tuple(paths)), paths)


def test_vectors_are_cached_and_reused_without_the_tower(tiny_model, tmp_path, monkeypatch):
    split, cache = _image_split(tmp_path), FeatureCache(tmp_path / "cache")
    first = split_token_vectors(
        tiny_model, split, [1, "final"], "model-a", cache, batch_size=2, progress=False
    )
    assert first.features.shape == (5, 6, 32)  # 3 vectors per block, never the token map
    files = sorted((tmp_path / "cache").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["blocks"] == [1, "final"]

    def refuse(*args, **kwargs):
        raise AssertionError("the tower ran although the vectors are cached")

    monkeypatch.setattr(FlipModel, "token_probe_vectors", refuse)
    again = split_token_vectors(
        tiny_model, split, [1, "final"], "model-a", cache, batch_size=2, progress=False
    )
    torch.testing.assert_close(again.features, first.features, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="tower ran"):  # other blocks: another cache entry
        split_token_vectors(tiny_model, split, ["final"], "model-a", cache, progress=False)
    with pytest.raises(AssertionError, match="tower ran"):  # another model: another entry
        split_token_vectors(tiny_model, split, [1, "final"], "model-b", cache, progress=False)


# -- planted signals at the feature level -------------------------------------------------------


def _synthetic(name: str, x: torch.Tensor, task: str = "attributes", **labels) -> SplitFeatures:
    n = len(x)
    images = PixelArrays(np.zeros((n, 2, 2), np.uint8), tuple(str(i) for i in range(n)))
    keys = [f"{name}{i}" for i in range(n)]
    if task == "attributes":
        y = labels.pop("y")
        split = LabelledSplit("synthetic", name, task, [f"a{i}" for i in range(y.shape[1])], y, images, keys)
    else:
        split = LabelledSplit("synthetic", name, task, [], np.zeros((n, 0)), images, keys, **labels)
    return SplitFeatures(x, split)


def _planted(n: int, seed: int, flip_rate: float = 0.0):
    """Vectors of 4 blocks x (cls, mean, max), width 64; the attribute is the sign of one
    coordinate of block 2's max vector (index 5), labels flipped at `flip_rate`. The pooled
    embedding (the final block's mean, index 10) is independent of it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, 64, generator=g)
    y = (x[:, 5, 3] > 0).numpy().astype(np.int8)
    flipped = (torch.rand(n, generator=g) < flip_rate).numpy()
    y[flipped] = 1 - y[flipped]
    return x, y[:, None]


def test_token_probe_finds_a_signal_the_pooled_embedding_and_its_probe_miss():
    splits = {
        name: _planted(n, seed) for name, n, seed in (("train", 1500, 0), ("val", 300, 1), ("test", 600, 2))
    }
    tokens = {k: _synthetic(k, x.clone(), y=y) for k, (x, y) in splits.items()}
    pooled = {k: _synthetic(k, x[:, 10].clone(), y=y) for k, (x, y) in splits.items()}
    probe = TokenProbe("train", "val", epochs=15, lr=0.03, batch_size=64)
    found = probe.metrics(tokens["train"], tokens["test"], tokens["val"], None)
    missed = LinearProbe("train", "val", fractions=[1.0]).metrics(
        pooled["train"], pooled["test"], pooled["val"], None
    )
    assert found["summary"]["mean_accuracy"] > 0.93
    assert abs(missed["summary"]["mean_accuracy"] - 0.5) < 0.07
    assert found["selected"]["on"] == "val" and 1 <= found["selected"]["epoch"] <= 15


@pytest.mark.parametrize("head", ["flip", "facer"])
def test_both_heads_learn_and_are_deterministic(head):
    (x, y), (xt, yt) = _planted(1200, 0), _planted(400, 1)
    probe = TokenProbe(
        "train", None, head=head, dropout=0.1 if head == "facer" else 0.0, epochs=15, lr=0.03, batch_size=64
    )
    runs = [
        probe.metrics(_synthetic("train", x.clone(), y=y), _synthetic("test", xt.clone(), y=yt), None, None)
    ]
    runs.append(
        probe.metrics(_synthetic("train", x.clone(), y=y), _synthetic("test", xt.clone(), y=yt), None, None)
    )
    assert runs[0]["summary"]["mean_accuracy"] > 0.9
    assert runs[0] == runs[1]
    assert runs[0]["selected"]["on"] == "held-out 20% of train (not refit)" and runs[0]["n_train"] == 960


def test_heads_apply_their_published_layer_norms_and_weights():
    for kind in ("flip", "facer"):
        head = TokenHead(6, 8, 3, kind)
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(torch.randn_like(p))
        x = torch.randn(5, 6, 8)
        if kind == "flip":  # one LayerNorm over every vector, raw weights, Linear
            ln = torch.nn.LayerNorm(8)
            ln.weight.data, ln.bias.data = head.gamma.data, head.beta.data
            expected = head.linear((head.weight[None, :, None] * ln(x)).sum(1))
        else:  # a LayerNorm per vector, softmax weights, Linear
            normed = torch.stack(
                [F.layer_norm(x[:, v], (8,), head.gamma[v], head.beta[v], 1e-5) for v in range(6)], 1
            )
            expected = head.linear((head.weight.softmax(0)[None, :, None] * normed).sum(1))
        torch.testing.assert_close(head.eval()(normalize_vectors_(x.clone())), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["flip", "facer"])
@pytest.mark.parametrize("task", ["attributes", "classification", "multitask"])
def test_written_out_gradients_equal_autograds(kind, task):
    g = torch.Generator().manual_seed(0)
    z = normalize_vectors_(torch.randn(10, 6, 8, generator=g))
    if task == "classification":
        labels = torch.randint(0, 3, (10,), generator=g).numpy()
        names = ["x", "y", "z"]
        images = PixelArrays(np.zeros((10, 2, 2), np.uint8), tuple(str(i) for i in range(10)))
        split = LabelledSplit("s", "s", "classification", names, labels, images, [str(i) for i in range(10)])
        targets = ProbeTargets.of(split)
    elif task == "attributes":
        targets = ProbeTargets.of(
            _synthetic("s", z, y=(torch.rand(10, 3, generator=g) < 0.5).numpy().astype(np.int8)).split
        )
    else:
        labels = {"questions": {"q": (["a", "b", "c"], np.array([0, 1, 2, -1, 0, 1, 2, 0, 1, 2]))}}
        labels["values"] = {"age": np.array([20.0, 30, np.nan, 41, 52, 18, 60, 33, np.nan, 25])}
        targets = ProbeTargets.of(_synthetic("m", z, task="multitask", **labels).split)
    head = TokenHead(6, 8, targets.outputs, kind, dropout=0.3)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    rows = torch.arange(10)
    torch.manual_seed(5)
    expected_loss = targets.loss(head(z), rows)
    expected_loss.backward()
    torch.manual_seed(5)  # the same dropout mask
    keep = head.dropout_keep(10, z.device)
    with torch.no_grad():
        loss, grads = batch_gradients(head, z[rows], rows, targets, keep)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    for name, p in head.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_equals_autograd_and_torch_adamw_step_by_step():
    """fit_token_probe against FLIP's head as its script writes it (LayerNorm on every raw batch,
    raw weights [1, V, 1], Linear; xavier init after torch.manual_seed(seed)), trained by autograd
    and torch.optim.AdamW on the same batches (the seeded per-epoch permutation) at the per-epoch
    cosine rate: the same weights after every epoch."""
    n, v, d, a, settings = 96, 4, 16, 3, ProbeSettings(epochs=4, lr=0.01, batch_size=20, compile=False)
    g = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(n, v, d, generator=g) + 0.5
    y = (torch.rand(n, a, generator=g) < 0.4).float()
    targets = ProbeTargets("attributes", a, y, mask=torch.ones(n, a, dtype=torch.bool))
    ours = []
    fit_token_probe(
        normalize_vectors_(x.clone()),
        targets,
        settings,
        on_epoch=lambda e, h: ours.append({k: p.detach().clone() for k, p in h.named_parameters()}),
    )

    torch.manual_seed(settings.seed)
    ln, weights, linear = (
        torch.nn.LayerNorm(d),
        torch.nn.Parameter(torch.empty(1, v, 1)),
        torch.nn.Linear(d, a),
    )
    torch.nn.init.xavier_uniform_(weights)
    torch.nn.init.xavier_uniform_(linear.weight)
    params = {"gamma": ln.weight, "beta": ln.bias, "weight": weights, "linear.weight": linear.weight}
    params["linear.bias"] = linear.bias
    optimizer = torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    order = torch.Generator().manual_seed(settings.seed)
    for epoch in range(settings.epochs):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * settings.lr * (1 + math.cos(math.pi * epoch / settings.epochs))
        for batch in torch.randperm(n, generator=order).split(settings.batch_size):
            loss = F.binary_cross_entropy_with_logits(linear((weights * ln(x[batch])).sum(1)), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for name, p in params.items():
            torch.testing.assert_close(
                ours[epoch][name],
                p.detach().reshape(-1) if name == "weight" else p.detach(),
                rtol=0,
                atol=1e-5,
                msg=f"{name} after epoch {epoch + 1}",
            )


def test_compiled_step_trains_as_eager_with_one_graph_for_every_training_size(caplog):
    """compile=True trains the head eager training gives (up to rounding), and a second training
    set of another size reuses the compiled step: the labels' row count is dynamic, so a probe
    on one benchmark's split leaves nothing to recompile for the next (nor, through inductor's
    on-disk cache, for the next process)."""
    from torch._dynamo.utils import counters

    v, d, a = 3, 16, 3

    def fit(n: int, compile_: bool) -> TokenHead:
        g = torch.Generator().manual_seed(n)
        x = normalize_vectors_(torch.randn(n, v, d, generator=g))
        y = (x[:, 1, :a] > 0).float()
        targets = ProbeTargets("attributes", a, y, mask=torch.rand(n, a, generator=g) < 0.9)
        settings = ProbeSettings(epochs=2, lr=0.01, batch_size=16, compile=compile_)
        return fit_token_probe(x, targets, settings)

    graphs = counters["stats"]["unique_graphs"]
    with caplog.at_level("WARNING", logger=token_head.__name__):
        compiled = fit(80, True)
        after_first = counters["stats"]["unique_graphs"]
        fit(112, True)
    assert "compile failed" not in caplog.text
    assert after_first == graphs + 1  # the step was compiled (not the eager fallback) ...
    assert counters["stats"]["unique_graphs"] == after_first  # ... and not again for 112 rows
    eager = fit(80, False)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


# -- losses by task ----------------------------------------------------------------------------


def test_losses_by_task_equal_a_computation_by_hand():
    rng = np.random.default_rng(0)
    n = 6
    logits = torch.from_numpy(rng.normal(size=(n, 7)).astype(np.float32))
    # attributes: BCE over the labelled entries only
    y = rng.integers(-1, 2, size=(n, 7)).astype(np.int8)
    split = _synthetic("s", torch.zeros(n, 1, 1), y=y).split
    p = 1 / (1 + np.exp(-logits.numpy()))
    bce = np.where(y == 1, -np.log(p), -np.log(1 - p))
    got = ProbeTargets.of(split).loss(logits, slice(None))
    assert math.isclose(float(got), bce[y >= 0].mean(), rel_tol=1e-5)
    # multitask: cross-entropy per question (-1 unlabelled) + L1 on the standardised value (NaN unlabelled)
    q1, q2 = np.array([0, 2, 1, -1, 0, 2]), np.array([1, 0, -1, -1, 1, 0])
    age = np.array([20.0, np.nan, 35.0, 50.0, 41.0, np.nan])
    split = _synthetic(
        "m",
        torch.zeros(n, 1, 1),
        task="multitask",
        questions={"race": (["a", "b", "c"], q1), "gender": (["f", "m"], q2)},
        values={"age": age},
    ).split
    targets = ProbeTargets.of(split)
    assert targets.outputs == 6
    logits = logits[:, :6]
    lp1, lp2 = (torch.log_softmax(logits[:, s].double(), 1).numpy() for s in (slice(0, 3), slice(3, 5)))
    ce1 = -np.mean([lp1[i, q1[i]] for i in range(n) if q1[i] >= 0])
    ce2 = -np.mean([lp2[i, q2[i]] for i in range(n) if q2[i] >= 0])
    known = np.isfinite(age)
    mean, std = age[known].mean(), age[known].std()
    l1 = np.abs(logits[:, 5].numpy()[known] - (age[known] - mean) / std).mean()
    assert math.isclose(float(targets.loss(logits, slice(None))), ce1 + ce2 + l1, rel_tol=1e-5)


def test_multitask_probe_learns_questions_and_age_with_l1():
    def make(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 6, 32, generator=g)
        gender = (x[:, 2, 1] > 0).long().numpy()  # one block carries both: the head mixes blocks
        age = 40 + 12 * x[:, 2, 0].numpy().astype(float)
        age[::7] = np.nan
        labels = {"questions": {"gender": (["f", "m"], gender)}, "values": {"age": age}}
        return _synthetic(f"s{seed}", x, task="multitask", **labels)

    train, test = make(1500, 0), make(400, 1)
    metrics = TokenProbe("train", None, epochs=10, lr=0.01, batch_size=64).metrics(train, test, None, None)
    assert metrics["summary"]["gender_accuracy"] > 0.88
    # chance: the mean absolute deviation of N(40, 12), 9.6 years
    assert metrics["summary"]["age_mae"] < 3.5 and metrics["summary"]["age_cs5"] > 0.85
    assert metrics["regression"]["age"]["n"] == int(np.isfinite(test.split.values["age"]).sum())
    age = metrics["regression"]["age"]  # the labelled pairs the scatter plot draws, and their MAE
    assert age["true"] == [round(float(v), 3) for v in test.split.values["age"] if np.isfinite(v)]
    assert age["mae"] == pytest.approx(mean_absolute_error(age["true"], age["predicted"]), abs=1e-3)
    assert "multiclass" in metrics and metrics["per_label"] == {}


# -- selection ---------------------------------------------------------------------------------


def test_honest_selection_and_test_as_published_against_an_independent_rerun():
    (x, y), (xv, yv), (xt, yt) = _planted(600, 0, 0.2), _planted(150, 1, 0.2), _planted(150, 2, 0.2)
    settings = dict(epochs=12, lr=0.02, batch_size=32, seed=3)
    honest = TokenProbe("train", "val", **settings).metrics(
        _synthetic("train", x.clone(), y=y),
        _synthetic("test", xt.clone(), y=yt),
        _synthetic("val", xv.clone(), y=yv),
        None,
    )
    published = TokenProbe("train", "val", selection="test_as_published", **settings).metrics(
        _synthetic("train", x.clone(), y=y),
        _synthetic("test", xt.clone(), y=yt),
        _synthetic("val", xv.clone(), y=yv),
        None,
    )
    # the same training and the same honest figure, whatever the selection option
    assert published["summary"] == honest["summary"] and published["selected"] == honest["selected"]
    # an independent rerun: test and val accuracy after every epoch
    z, zv, zt = (normalize_vectors_(v.clone(), torch.bfloat16) for v in (x, xv, xt))  # the default
    train_targets = ProbeTargets.of(_synthetic("train", x, y=y).split)
    per_epoch = {"val": [], "test": []}

    def record(epoch, head):
        for name, (features, labels) in {"val": (zv, yv), "test": (zt, yt)}.items():
            per_epoch[name].append(float(((predict(head, features) > 0).numpy() == labels).mean()))

    fit_token_probe(z, train_targets, ProbeSettings(**settings), on_epoch=record)
    val_best, test_best = int(np.argmax(per_epoch["val"])), int(np.argmax(per_epoch["test"]))
    assert honest["selected"]["epoch"] == val_best + 1
    assert honest["summary"]["mean_accuracy"] == pytest.approx(per_epoch["test"][val_best])
    block = published["as_published"]
    assert block["label"] == AS_PUBLISHED == "selected on test, as published"
    assert block["selected"]["epoch"] == test_best + 1
    assert block["summary"]["mean_accuracy"] == pytest.approx(per_epoch["test"][test_best])
    assert block["summary"]["mean_accuracy"] >= honest["summary"]["mean_accuracy"]
    assert "as_published" not in honest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_vectors_are_normalised_chunk_by_chunk_in_their_own_memory(dtype, monkeypatch):
    monkeypatch.setattr(token_head, "CHUNK_BYTES", 3 * 4 * 8 * 4)  # 3 rows a chunk: 7 chunks, one short
    stored = torch.float64 if dtype == torch.float64 else torch.float32  # float64 stays float64
    x = 3.0 * torch.randn(20, 4, 8, generator=torch.Generator().manual_seed(0), dtype=stored) + 1.0
    expected = F.layer_norm(x, (8,), eps=1e-5).to(dtype)
    z = normalize_vectors_(x, dtype)
    assert z.dtype == dtype and z.shape == x.shape
    assert z.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # no second copy
    torch.testing.assert_close(z, expected, rtol=0, atol=0)
    strided = torch.randn(6, 8, 4, dtype=stored).transpose(1, 2)  # not contiguous: normalised in a copy
    torch.testing.assert_close(
        normalize_vectors_(strided, dtype), F.layer_norm(strided, (8,), eps=1e-5).to(dtype), rtol=0, atol=0
    )


def test_bfloat16_vectors_train_the_head_the_float32_ones_do():
    """On a planted signal the head trained on bfloat16 vectors predicts as the float32 one does."""
    (x, y), (xt, _) = _planted(1500, 0, 0.1), _planted(600, 1)
    targets = ProbeTargets.of(_synthetic("train", x, y=y).split)
    settings = ProbeSettings(epochs=8, lr=0.03, batch_size=64, compile=False)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        head = fit_token_probe(normalize_vectors_(x.clone(), dtype), targets, settings)
        logits[dtype] = predict(head, normalize_vectors_(xt.clone(), dtype))
    fp32, bf16 = logits[torch.float32], logits[torch.bfloat16]
    assert bf16.dtype == torch.float32  # the head computes in float32 whatever the vectors' dtype
    assert float(((fp32 > 0) == (bf16 > 0)).float().mean()) >= 0.99
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.01 * float(fp32.abs().max()))
    assert not torch.equal(bf16, fp32)  # the vectors' dtype reached the training


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_the_probe_trains_on_vectors_of_its_vector_dtype(name, dtype, monkeypatch):
    seen = []
    fit = token_probe.fit_token_probe

    def recording(x, *args, **kwargs):
        seen.append(x.dtype)
        return fit(x, *args, **kwargs)

    monkeypatch.setattr(token_probe, "fit_token_probe", recording)
    (x, y), (xt, yt) = _planted(200, 0), _planted(100, 1)
    probe = TokenProbe("train", None, epochs=2, lr=0.03, batch_size=64, vector_dtype=name)
    found = probe.metrics(_synthetic("train", x, y=y), _synthetic("test", xt, y=yt), None, None)
    assert seen == [dtype] and found["settings"]["vector_dtype"] == name


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"head='farl'.*\('flip', 'facer'\)"):
        TokenProbe("train", head="farl")
    with pytest.raises(ValueError, match=r"selection='test'.*honest"):
        TokenProbe("train", selection="test")
    with pytest.raises(ValueError, match=r"vector_dtype='float16'.*'bfloat16'"):
        TokenProbe("train", vector_dtype="float16")


# -- end to end --------------------------------------------------------------------------------


def test_eval_token_probe_on_the_demo_checkpoint(trained_demo, tmp_path):
    cfg = compose_eval(
        "eval_token_probe",
        tmp_path,
        *eval_overrides(tmp_path, trained_demo.ckpt, "faceshapes", trained_demo.faceshapes),
        "protocols.token_probe.epochs=4",
        "protocols.token_probe.selection=test_as_published",
    )
    metrics = run_token_probe(cfg)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["protocol"] == "token_probe" and written["blocks"] == [1, "final"]
    assert written["vectors"] == 6 and written["selected"]["on"] == "val"
    assert 1 <= written["selected"]["epoch"] <= 4 and len(written["selected"]["scores"]) == 4
    per_label = written["per_label"]
    assert written["summary"]["mean_accuracy"] == pytest.approx(
        np.mean([m["accuracy"] for m in per_label.values()])
    )
    assert max(written["as_published"]["selected"]["scores"]) == pytest.approx(
        written["as_published"]["summary"]["mean_accuracy"]
    )
    report = (tmp_path / "out" / "report.md").read_text()
    assert "selected on test, as published" in report and "honest (epoch" in report
    assert set(written["skipped"]) == {"train", "val", "test"}


def _record_test_outputs(monkeypatch) -> list[torch.Tensor]:
    """Every head output the protocol computes, in order (the test split's come last)."""
    from flip.evaluation import token_probe

    outputs, original = [], token_probe.predict

    def recording(*args, **kwargs):
        outputs.append(original(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(token_probe, "predict", recording)
    return outputs


def _attribute_figures(logits: torch.Tensor, truth: np.ndarray) -> tuple[float, float]:
    """Mean over attributes of accuracy and of balanced accuracy (the mean recall of the classes
    present), by hand from the head's outputs (logit > 0: present) and 0/1 labels [N, 40]."""
    decided = logits.numpy() > 0
    accuracy = (decided == truth).mean(axis=0)
    balanced = [
        np.mean([(decided[truth[:, a] == c, a] == c).mean() for c in (0, 1) if (truth[:, a] == c).any()])
        for a in range(truth.shape[1])
    ]
    return float(accuracy.mean()), float(np.mean(balanced))


def _check_paper_metrics(out, metrics, outputs, truth, selected_on: str, epochs: int) -> None:
    """metrics.json names the papers' metrics and they equal the figures by hand from the probe's
    own test outputs: the honest epoch's (second to last), then the epoch chosen on test (last)."""
    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["protocol"] == "token_probe" and written["task"] == "attributes"
    assert set(written["summary"]) == {"mean_accuracy", "mean_balanced_accuracy"}
    assert written["labels"] == list(CELEBA_ATTRIBUTES) and written["n_test"] == len(truth)
    assert written["selected"]["on"] == selected_on and len(written["selected"]["scores"]) == epochs
    honest, published = outputs[-2], outputs[-1]
    assert honest.shape == published.shape == (len(truth), 40)
    accuracy, balanced = _attribute_figures(honest, truth)
    assert written["summary"]["mean_accuracy"] == pytest.approx(accuracy)
    assert written["summary"]["mean_balanced_accuracy"] == pytest.approx(balanced)
    block = written["as_published"]
    assert block["label"] == AS_PUBLISHED and len(block["selected"]["scores"]) == epochs
    accuracy, balanced = _attribute_figures(published, truth)
    assert block["summary"]["mean_accuracy"] == pytest.approx(accuracy) == max(block["selected"]["scores"])
    assert block["summary"]["mean_balanced_accuracy"] == pytest.approx(balanced)
    report = (out / "report.md").read_text()
    assert f"honest (epoch {written['selected']['epoch']}, chosen on {selected_on})" in report
    assert "selected on test, as published" in report


def test_eval_token_probe_on_a_celeba_layout(trained_demo, tmp_path, monkeypatch):
    rows = write_celeba(tmp_path / "celeba", count=20)  # the official Anno/ Eval/ Img/ layout
    truth = np.array([[v[a] for a in CELEBA_ATTRIBUTES] for _, v, split in rows if split == "test"], int)
    outputs = _record_test_outputs(monkeypatch)
    cfg = compose_eval(
        "eval_token_probe",
        tmp_path,
        *eval_overrides(tmp_path, trained_demo.ckpt, "celeba", tmp_path / "celeba"),
        "protocols.token_probe.epochs=3",
        "protocols.token_probe.selection=test_as_published",
    )
    _check_paper_metrics(tmp_path / "out", run_token_probe(cfg), outputs, truth, "val", 3)


@pytest.mark.parametrize("write", [write_flip_csv, write_celeba_text], ids=["flip_csv", "celeba_text"])
def test_eval_token_probe_on_both_lfwa_layouts(trained_demo, tmp_path, monkeypatch, write):
    (tmp_path / "lfwa").mkdir()
    write(tmp_path / "lfwa")
    truth = np.array([_values(10 + i) for i in range(len(LFWA_TEST))])  # the test list's labels
    outputs = _record_test_outputs(monkeypatch)
    cfg = compose_eval(
        "eval_token_probe",
        tmp_path,
        *eval_overrides(tmp_path, trained_demo.ckpt, "lfwa", tmp_path / "lfwa"),
        "protocols.token_probe.epochs=2",
        "protocols.token_probe.selection=test_as_published",
    )
    metrics = run_token_probe(cfg)
    held_out = "held-out 20% of train (not refit)"  # LFWA has no val split
    _check_paper_metrics(tmp_path / "out", metrics, outputs, truth, held_out, 2)
    assert metrics["n_train"] == len(LFWA_TRAIN) - 1 and metrics["val_split"] is None
