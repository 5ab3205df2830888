"""Each loss against a naive reference written here (loops, no chunking, no tricks), ClipLoss and
SigLipLoss against open_clip, and the Hydra loss configs and their error messages."""

from __future__ import annotations

import math

import open_clip.loss as oc
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import flip.losses.filip as filip_module
from flip.losses import ClipLoss, CombinedLoss, FilipLoss, SigLipLoss, build_loss, filip_similarity
from flip.losses.clip import contrastive_labels
from flip.models.outputs import EncoderOutput

from .helpers import count_filip_blocks, loss_file

NEG_INF = float("-inf")


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def pooled(seed: int, b: int = 6, d: int = 8, scale: float = 1 / 0.07, bias: float | None = None):
    g = torch.Generator().manual_seed(seed)
    img, txt = (leaf(F.normalize(torch.randn(b, d, generator=g), dim=-1)) for _ in range(2))
    return img, txt, leaf(torch.tensor(scale)), None if bias is None else leaf(torch.tensor(bias))


def tokens(seed: int, b: int = 6, ni: int = 5, nt: int = 7, d: int = 8, image_mask: bool = False):
    """Normalised token features, ragged caption masks (>= 2 valid: SOT + one more), scale."""
    g = torch.Generator().manual_seed(seed)
    img = leaf(F.normalize(torch.randn(b, ni, d, generator=g), dim=-1))
    txt = leaf(F.normalize(torch.randn(b, nt, d, generator=g), dim=-1))
    tmask = torch.arange(nt)[None] < torch.randint(2, nt + 1, (b,), generator=g)[:, None]
    imask = (
        torch.arange(ni)[None] < torch.randint(1, ni + 1, (b,), generator=g)[:, None] if image_mask else None
    )
    txt.data[~tmask] = 0.0  # pads as a model might leave them: zero features, whose similarity is 0
    return img, txt, tmask, imask, leaf(torch.tensor(1 / 0.07 * (0.5 + torch.rand(1, generator=g).item())))


def assert_same(fn_a, fn_b, inputs, vtol: float = 1e-5, gtol: float = 1e-4) -> None:
    """Equal values, and equal gradients wrt every input that requires grad."""
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    a, b = fn_a(*inputs), fn_b(*inputs)
    assert torch.isfinite(a) and abs(a.item() - b.item()) <= vtol, (a.item(), b.item())
    for ga, gb in zip(torch.autograd.grad(a, wrt), torch.autograd.grad(b, wrt), strict=True):
        torch.testing.assert_close(ga, gb, atol=gtol, rtol=0)


# ---------------------------------------------------------------------------- naive references


def naive_infonce(s_img: list[list[torch.Tensor]], s_txt: list[list[torch.Tensor]]) -> torch.Tensor:
    """Mean of -log softmax at the own pair, rows over texts (s_img[i][j]) and over images (s_txt[j][i])."""
    b, total = len(s_img), 0.0
    for i in range(b):
        total = total - (s_img[i][i] - torch.logsumexp(torch.stack(s_img[i]), 0))
        total = total - (s_txt[i][i] - torch.logsumexp(torch.stack(s_txt[i]), 0))
    return total / (2 * b)


def naive_clip(img, txt, scale, bias=None):
    b, shift = img.shape[0], 0.0 if bias is None else bias
    s_img = [[scale * (img[i] * txt[j]).sum() + shift for j in range(b)] for i in range(b)]
    s_txt = [[scale * (txt[j] * img[i]).sum() + shift for i in range(b)] for j in range(b)]
    return naive_infonce(s_img, s_txt)


def naive_siglip(img, txt, scale, bias):
    b, total = img.shape[0], 0.0
    for i in range(b):
        for j in range(b):
            z = scale * (img[i] * txt[j]).sum() + bias
            total = total - torch.log(torch.sigmoid(z if i == j else -z))
    return total / b


def naive_filip_sims(img, txt, tmask, imask=None):
    """s_I[i][j], s_T[i][j] pair by pair, padding simply indexed away."""
    b = img.shape[0]
    imask = torch.ones(img.shape[:2], dtype=torch.bool) if imask is None else imask
    s_i, s_t = [[None] * b for _ in range(b)], [[None] * b for _ in range(b)]
    for i in range(b):
        for j in range(b):
            sim = img[i][imask[i]] @ txt[j][tmask[j]].T
            s_i[i][j], s_t[i][j] = sim.max(1).values.mean(), sim.max(0).values.mean()
    return s_i, s_t


def naive_filip(img, txt, scale, tmask, imask=None, bias=None):
    s_i, s_t = naive_filip_sims(img, txt, tmask, imask)
    b, shift = img.shape[0], 0.0 if bias is None else bias
    logits_img = [[scale * s_i[i][j] + shift for j in range(b)] for i in range(b)]
    logits_txt = [[scale * s_t[i][j] + shift for i in range(b)] for j in range(b)]
    return naive_infonce(logits_img, logits_txt)


def weighted(sims, weights: torch.Tensor) -> torch.Tensor:
    """One scalar from both directions' B x B similarities, each pair weighted differently, to
    differentiate: every entry's gradient shows, not only their sum's."""
    return (weights[0] * sims[0]).sum() + (weights[1] * sims[1]).sum()


def dense_filip_sims(img, txt, tmask, imask=None):
    """The whole B x B x Ni x Nt tensor at once (what the chunked version must equal)."""
    sim = torch.einsum("ikd,jrd->ijkr", img, txt).masked_fill(~tmask[None, :, None, :], NEG_INF)
    imask = torch.ones(img.shape[:2], dtype=torch.bool) if imask is None else imask
    sim = sim.masked_fill(~imask[:, None, :, None], NEG_INF)
    s_i = torch.where(imask[:, None], sim.amax(3), 0).sum(2) / imask.sum(1)[:, None]
    s_t = torch.where(tmask[None], sim.amax(2), 0).sum(2) / tmask.sum(1)[None]
    return s_i, s_t


# ---------------------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("bias", [None, -2.5])
def test_clip_matches_naive(seed, bias):
    assert_same(ClipLoss(), naive_clip, pooled(seed, bias=bias))


@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("gather_with_grad", [False, True])
@pytest.mark.parametrize("cache_labels", [False, True])
@pytest.mark.parametrize("bias", [None, 1.5])
def test_clip_matches_open_clip(local_loss, gather_with_grad, cache_labels, bias):
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels)
    ours, theirs = ClipLoss(**kw), oc.ClipLoss(**kw)
    for seed, b in [(21, 6), (22, 6), (23, 9)]:  # repeated and resized batches exercise the label cache
        assert_same(ours, theirs, pooled(seed, b=b, bias=bias))


def test_local_loss_labels_point_at_own_pair_in_gathered_batch():
    assert contrastive_labels(4, torch.device("cpu"), rank=1, world_size=2, local_loss=True).tolist() == [
        4,
        5,
        6,
        7,
    ]
    assert contrastive_labels(4, torch.device("cpu"), rank=1, world_size=2).tolist() == [0, 1, 2, 3]


# -------------------------------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_siglip_matches_naive(seed):
    assert_same(SigLipLoss(), naive_siglip, pooled(seed, scale=10.0 * (1 + seed % 3), bias=-10.0 + seed % 5))


@pytest.mark.parametrize("dist_impl", ["bidir", "shift", "reduce", "gather"])
@pytest.mark.parametrize("cache_labels", [False, True])
def test_siglip_matches_open_clip(dist_impl, cache_labels):
    ours = SigLipLoss(cache_labels=cache_labels, dist_impl=dist_impl)
    theirs = oc.SigLipLoss(cache_labels=cache_labels, dist_impl=dist_impl)
    for seed, b in [(41, 6), (42, 6), (43, 10)]:
        assert_same(ours, theirs, pooled(seed, b=b, scale=10.0, bias=-10.0))


def test_siglip_rejects_unknown_dist_impl():
    with pytest.raises(ValueError, match="bidir, shift, reduce, gather"):
        SigLipLoss(dist_impl="ring")


# --------------------------------------------------------------------------------------- FILIP


@pytest.mark.parametrize("seed", [51, 52, 53])
@pytest.mark.parametrize("image_mask", [False, True])
@pytest.mark.parametrize("exclude_sot", [False, True])
def test_filip_matches_naive(seed, image_mask, exclude_sot):
    img, txt, tmask, imask, scale = tokens(seed, image_mask=image_mask)
    ref_mask = tmask.clone()
    ref_mask[:, 0] &= not exclude_sot
    loss = FilipLoss(chunk_size=4, exclude_sot=exclude_sot)
    assert_same(
        lambda i, t, s: loss(i, t, s, text_token_mask=tmask, image_token_mask=imask),
        lambda i, t, s: naive_filip(i, t, s, ref_mask, imask),
        (img, txt, scale),
    )


def test_filip_bias_matches_naive():
    img, txt, tmask, _, scale = tokens(54)
    bias = leaf(torch.tensor(-3.0))
    loss = FilipLoss(exclude_sot=False)
    assert_same(
        lambda i, t, s, b: loss(i, t, s, b, text_token_mask=tmask),
        lambda i, t, s, b: naive_filip(i, t, s, tmask, bias=b),
        (img, txt, scale, bias),
    )


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 6, 7, 64])
def test_chunked_filip_equals_dense(chunk_size):
    img, txt, tmask, imask, _ = tokens(
        61, b=7, ni=6, nt=9, image_mask=True
    )  # 7 pairs: most chunks don't divide
    weights = torch.randn(2, 7, 7, generator=torch.Generator().manual_seed(62))

    assert_same(
        lambda i, t: weighted(filip_similarity(i, t, imask, tmask, chunk_size=chunk_size), weights),
        lambda i, t: weighted(dense_filip_sims(i, t, tmask, imask), weights),
        (img, txt),
    )
    # rectangular (local_loss) shapes and one direction at a time
    s_i, s_t = dense_filip_sims(img[:3], txt, tmask, imask[:3])
    c_i, none = filip_similarity(img[:3], txt, imask[:3], tmask, chunk_size=chunk_size, t2i=False)
    none2, c_t = filip_similarity(img[:3], txt, imask[:3], tmask, chunk_size=chunk_size, i2t=False)
    assert none is None and none2 is None and c_i.shape == c_t.shape == (3, 7)
    torch.testing.assert_close(c_i, s_i, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_t, s_t, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("chunk_size", "keep_bytes", "forward_blocks", "backward_blocks"),
    [("auto", None, 1, 0), ("auto", 0, 1, 1), (3, None, 9, 9)],
    ids=["one block: arg-maxes kept", "one block over the cap: recomputed", "nine blocks: recomputed"],
)
def test_backward_reuses_forwards_arg_maxes_when_the_block_is_one_and_small(
    monkeypatch, chunk_size, keep_bytes, forward_blocks, backward_blocks
):
    """Recomputing the similarity in backward is the price of chunking; one small block skips it."""
    if keep_bytes is not None:
        monkeypatch.setattr(filip_module, "KEEP_ARG_MAXES_BYTES", keep_bytes)
    img, txt, tmask, imask, _ = tokens(63, b=7, ni=6, nt=9, image_mask=True)
    weights = torch.randn(2, 7, 7, generator=torch.Generator().manual_seed(64))
    calls = count_filip_blocks(monkeypatch)
    ours = filip_similarity(img, txt, imask, tmask, chunk_size=chunk_size)
    assert len(calls) == forward_blocks
    got = torch.autograd.grad(weighted(ours, weights), (img, txt))
    assert len(calls) == forward_blocks + backward_blocks
    dense = dense_filip_sims(img, txt, tmask, imask)
    want = torch.autograd.grad(weighted(dense, weights), (img, txt))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("chunk_size", "tolerance"),
    [("auto", 0.0), (5, 0.01)],
    ids=["one block: exact", "blocks recomputed: bf16 partial sums"],
)
def test_filip_gradient_under_cpu_autocast_goes_to_the_tokens_forward_picked(chunk_size, tolerance):
    """Under bf16 autocast on the CPU, forward's similarities are bf16, where near-ties are common.

    The gradient must be that of the maxima forward computed: backward recomputes blocks under
    forward's autocast state. (Recomputed in float32, as `custom_fwd(device_type="cuda")` left CPU
    runs, the arg-maxes differed and a quarter of the largest gradient went to other tokens.)
    Blocks add their bf16 gradient products one by one: equal within 1% of the largest gradient.
    """
    g = torch.Generator().manual_seed(65)
    b, ni, nt, d = 16, 16, 12, 32
    img = leaf(F.normalize(torch.randn(b, ni, d, generator=g), dim=-1))
    txt = leaf(F.normalize(torch.randn(b, nt, d, generator=g), dim=-1))
    weights = torch.randn(2, b, b, generator=g)

    def forwards_maxima(i, t):  # as forward computes them: one bf16 matmul, maxima, float32 means
        sim = (i.reshape(b * ni, d) @ t.reshape(b * nt, d).T).view(b, ni, b, nt)
        return sim.max(3).values.float().mean(1), sim.max(1).values.float().mean(2)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = filip_similarity(img, txt, chunk_size=chunk_size)
        reference = forwards_maxima(img, txt)
    for o, r in zip(ours, reference, strict=True):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=0)
    got, want = (torch.autograd.grad(weighted(s, weights), (img, txt)) for s in (ours, reference))
    for o, r in zip(got, want, strict=True):
        torch.testing.assert_close(o, r, atol=1e-6 + tolerance * r.abs().max().item(), rtol=0)


def test_padding_cannot_win_a_max():
    """Every true similarity is negative and pads are zero vectors: a pad scores 0 and would win."""
    g = torch.Generator().manual_seed(71)
    b, n, d = 5, 6, 8
    axis = F.normalize(torch.randn(d, generator=g), dim=0)
    img = leaf(F.normalize(axis + 0.3 * torch.randn(b, n, d, generator=g), dim=-1))
    txt = F.normalize(-axis + 0.3 * torch.randn(b, n, d, generator=g), dim=-1)
    tmask = torch.arange(n)[None] < torch.tensor([2, 3, 6, 4, 5])[:, None]
    txt = leaf(txt * tmask[..., None])
    s_i, s_t = naive_filip_sims(img, txt, tmask)
    assert max(s.item() for row in s_i for s in row) < 0  # the premise: no true similarity is >= 0
    ours_i, ours_t = filip_similarity(img, txt, None, tmask)
    torch.testing.assert_close(ours_i, torch.stack([torch.stack(r) for r in s_i]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_t, torch.stack([torch.stack(r) for r in s_t]), atol=1e-6, rtol=0)
    # ...whereas letting the zero pads into the max (a bug some re-implementations have) differs
    unmasked_i, _ = filip_similarity(img, txt, None, None)
    assert (unmasked_i - ours_i)[:, tmask.sum(1) < n].min() > 0.1
    scale = leaf(torch.tensor(10.0))
    loss = FilipLoss(exclude_sot=False)
    assert_same(
        lambda i, t, s: loss(i, t, s, text_token_mask=tmask),
        lambda i, t, s: naive_filip(i, t, s, tmask),
        (img, txt, scale),
    )


def test_fully_masked_sides_give_zero_similarity_not_nan():
    img, txt, tmask, imask, scale = tokens(81, image_mask=True)
    tmask[2], imask[4] = False, False
    s_i, s_t = filip_similarity(img, txt, imask, tmask, chunk_size=4)
    assert (s_i[:, 2] == 0).all() and (s_t[:, 2] == 0).all() and (s_i[4] == 0).all() and (s_t[4] == 0).all()
    loss = FilipLoss(exclude_sot=False)(img, txt, scale, text_token_mask=tmask, image_token_mask=imask)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(t.grad).all() for t in (img, txt, scale))
    assert (txt.grad[2] == 0).all() and (img.grad[4] == 0).all()


def naive_topk(tokens_: torch.Tensor, valid: torch.Tensor, partners: torch.Tensor, partner_valid, fraction):
    """Per sample: score = best similarity with own pair's valid tokens; keep ceil(fraction * n_valid)."""
    kept, masks = [], []
    n = tokens_.shape[1]
    k = math.ceil(n * fraction)
    for x, v, y, pv in zip(tokens_, valid, partners, partner_valid, strict=True):
        score = (x @ y[pv].T).max(1).values.masked_fill(~v, NEG_INF)
        order = sorted(range(n), key=lambda r: -score[r].item())[:k]
        keep = math.ceil(int(v.sum()) * fraction)
        kept.append(x[order])
        masks.append(torch.tensor([rank < keep and bool(v[r]) for rank, r in enumerate(order)]))
    return torch.stack(kept), torch.stack(masks)


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_topk_selection_matches_naive(fraction):
    img, txt, tmask, imask, scale = tokens(91, b=6, ni=10, nt=8, image_mask=True)
    ref_tmask = tmask.clone()
    ref_tmask[:, 0] = False  # exclude_sot

    def naive(i, t, s):
        sel_i, sel_im = naive_topk(i, imask, t, ref_tmask, fraction)
        sel_t, sel_tm = naive_topk(t, ref_tmask, i, imask, fraction)
        return naive_filip(sel_i, sel_t, s, sel_tm, sel_im)

    loss = FilipLoss(topk_fraction=fraction, chunk_size=4, exclude_sot=True)
    assert_same(
        lambda i, t, s: loss(i, t, s, text_token_mask=tmask, image_token_mask=imask), naive, (img, txt, scale)
    )


def test_topk_fraction_one_keeps_everything():
    img, txt, tmask, _, scale = tokens(92)
    full, top = FilipLoss(), FilipLoss(topk_fraction=1.0)
    assert_same(
        lambda i, t, s: full(i, t, s, text_token_mask=tmask),
        lambda i, t, s: top(i, t, s, text_token_mask=tmask),
        (img, txt, scale),
    )


def test_filip_argument_errors():
    with pytest.raises(ValueError, match="topk_fraction"):
        FilipLoss(topk_fraction=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        FilipLoss(chunk_size=0)
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)
    img, txt, scale, _ = pooled(93)
    with pytest.raises(ValueError, match="return_tokens=True"):
        FilipLoss().loss_from_outputs(EncoderOutput(img, txt, scale))


# ---------------------------------------------------------------------------- combined + config


def outputs(seed: int, bias: float | None = None) -> EncoderOutput:
    img_tok, txt_tok, tmask, _, scale = tokens(seed)
    img, txt = F.normalize(img_tok.mean(1), dim=-1), F.normalize(txt_tok.sum(1), dim=-1)
    b = None if bias is None else leaf(torch.tensor(bias))
    return EncoderOutput(img, txt, scale, b, img_tok, txt_tok, tmask)


def test_combined_loss_weights_and_names():
    out = outputs(101)
    clip, filip = ClipLoss(), FilipLoss()
    combined = CombinedLoss({"clip": (clip, 0.25), "filip": (filip, 2.0)})
    values = combined(out)
    assert set(values) == {"clip", "filip", "loss"} and combined.requires_tokens
    torch.testing.assert_close(values["clip"], clip.loss_from_outputs(out))
    torch.testing.assert_close(values["filip"], filip.loss_from_outputs(out))
    torch.testing.assert_close(values["loss"], 0.25 * values["clip"] + 2.0 * values["filip"])
    assert not CombinedLoss({"clip": (clip, 1.0), "siglip": (SigLipLoss(), 1.0)}).requires_tokens
    with pytest.raises(ValueError, match="reserved"):
        CombinedLoss({"loss": (clip, 1.0)})
    with pytest.raises(TypeError, match="loss_from_outputs"):
        CombinedLoss({"mse": (torch.nn.MSELoss(), 1.0)})


def test_combined_loss_is_float32_under_bf16_autocast():
    """bf16-mixed training must not round the logits: the loss equals float32 on the same features."""
    out = outputs(102)
    bf16 = EncoderOutput(
        out.image_features.detach().bfloat16(),
        out.text_features.detach().bfloat16(),
        out.logit_scale.detach(),
        image_tokens=out.image_tokens.detach().bfloat16(),
        text_tokens=out.text_tokens.detach().bfloat16(),
        text_token_mask=out.text_token_mask,
    )
    combined = CombinedLoss({"clip": (ClipLoss(), 0.5), "filip": (FilipLoss(), 0.5)})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = combined(bf16)
    exact = combined(bf16.float())
    assert bf16.float().text_token_mask.dtype == torch.bool
    for name in ("clip", "filip", "loss"):
        assert mixed[name].dtype == torch.float32
        torch.testing.assert_close(mixed[name], exact[name], rtol=0, atol=1e-6)
    # what the guard prevents: the same loss computed in bf16 under autocast is visibly off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = ClipLoss().loss_from_outputs(bf16)
    assert abs(rounded.float().item() - exact["clip"].item()) > 1e-4


EXPECTED = {  # terms, and the model settings (the temperature init) the file makes
    "clip": ({"clip": (ClipLoss, 1.0)}, {}),
    "siglip": ({"siglip": (SigLipLoss, 1.0)}, {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}),
    "filip": ({"filip": (FilipLoss, 1.0)}, {}),
    "clip_filip": ({"clip": (ClipLoss, 0.5), "filip": (FilipLoss, 0.5)}, {}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loss_configs_build_and_run(name):
    cfg, model_settings = loss_file(name)
    terms, expected_settings = EXPECTED[name]
    assert model_settings == pytest.approx(expected_settings)
    loss = build_loss(cfg, rank=1, world_size=4)
    assert {n: (type(m), loss.weights[n]) for n, m in loss.terms.items()} == terms
    assert all(m.rank == 1 and m.world_size == 4 for m in loss.terms.values())
    assert loss.requires_tokens == ("filip" in terms)
    single = build_loss(cfg)  # rank 0 of 1: runnable here
    values = single(outputs(102, bias=model_settings.get("init_logit_bias")))
    values["loss"].backward()
    assert set(values) == {*terms, "loss"} and torch.isfinite(values["loss"])


def _clip_cfg() -> dict:
    return loss_file("clip")[0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c.update(temperature=0.07),
            r"unknown key\(s\) \['temperature'\] in the loss config; accepted: \['terms'\]",
        ),
        (
            lambda c: c.update(init_logit_scale=2.3, init_logit_bias=-10.0),
            r"loss.init_logit_scale is now model.init_logit_scale; "
            r"loss.init_logit_bias is now model.init_logit_bias",
        ),
        (lambda c: c.update(terms={}), "loss.terms must map"),
        (
            lambda c: c["terms"]["clip"].update(wieght=1.0),
            r"loss.terms.clip has unknown key\(s\) \['wieght'\]",
        ),
        (lambda c: c["terms"]["clip"].pop("loss"), "lacks the `loss` key"),
        (lambda c: c["terms"]["clip"].update(weight="high"), "weight must be a number"),
        (lambda c: c["terms"]["clip"]["loss"].pop("_target_"), "needs a `_target_`"),
        (
            lambda c: c["terms"]["clip"]["loss"].update(_target_="flip.losses.NoSuchLoss"),
            "cannot be imported",
        ),
        (
            lambda c: c["terms"]["clip"]["loss"].update(local_los=True),
            r"unknown key\(s\) \['local_los'\]; flip.losses.ClipLoss accepts \['local_loss'",
        ),
        (lambda c: c["terms"]["clip"]["loss"].update(rank=3), "which the trainer passes"),
        (
            lambda c: c["terms"]["clip"].update(
                loss={"_target_": "flip.losses.SigLipLoss", "dist_impl": "ring"}
            ),
            "loss.terms.clip.loss: unknown SigLipLoss dist_impl 'ring'; accepted: bidir",
        ),
    ],
)
def test_build_loss_names_the_bad_key(edit, message):
    cfg = _clip_cfg()
    edit(cfg)
    with pytest.raises(ValueError, match=message):
        build_loss(OmegaConf.create(cfg))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loss_configs_train_the_real_model(tiny_model, name):
    """The model's EncoderOutput (token features, open_clip pad mask) feeds every config's loss."""
    loss = build_loss(loss_file(name)[0])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(111))
    text = tiny_model.tokenize(["a face", "a smiling face with glasses", "an old man"])
    try:
        out = tiny_model(images, text, return_tokens=loss.requires_tokens)
        values = loss(out)
        values["loss"].backward()
        grads = {n: p.grad for n, p in tiny_model.named_parameters()}
        assert torch.isfinite(values["loss"]) and grads["clip.logit_scale"] is not None
        assert grads["clip.visual.proj"].abs().sum() > 0 and grads["clip.text_projection"].abs().sum() > 0
    finally:
        tiny_model.zero_grad(set_to_none=True)
