"""Attribute foils as extra negatives (flip.losses.foils) in every loss: against straightforward
references on random inputs, and on 2 gloo ranks against one process on the global batch."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flip.losses import ClipLoss, FilipLoss, SigLipLoss
from flip.models import build_model
from flip.models.outputs import EncoderOutput
from flip.training.module import FlipLitModule

from .helpers import MODEL, OPTIM, TINY_ARCH, loss_file
from .helpers.ranks import assert_two_ranks_equal_one_process

B, NF, NI, NT, IN, D = 4, 2, 5, 6, 12, 8


class Towers(nn.Module):
    """Linear towers with token outputs, and the foils' features made by the text tower."""

    def __init__(self, siglip: bool = False) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.image, self.text = nn.Linear(IN, D), nn.Linear(IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0) if siglip else math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if siglip else None

    def _text(self, texts, mask):
        tokens = F.normalize(self.text(texts), dim=-1)
        m = mask[..., None].float()
        return F.normalize((tokens * m).sum(-2) / m.sum(-2), dim=-1), tokens

    def forward(self, images, texts, mask, foils, foil_token_mask, foil_mask) -> EncoderOutput:
        image_tokens = F.normalize(self.image(images), dim=-1)
        text, text_tokens = self._text(texts, mask)
        foil, foil_tokens = self._text(foils, foil_token_mask)
        return EncoderOutput(
            F.normalize(image_tokens.mean(1), dim=-1), text, self.logit_scale.exp(), self.logit_bias,
            image_tokens, text_tokens, mask,
            foil_text_features=foil, foil_mask=foil_mask, foil_text_tokens=foil_tokens,
            foil_text_token_mask=foil_token_mask,
        )  # fmt: skip


def batch(n: int, rows: slice = slice(None)):
    g = torch.Generator().manual_seed(7)
    images, texts = torch.randn(n, NI, IN, generator=g), torch.randn(n, NT, IN, generator=g)
    mask = torch.arange(NT)[None] < torch.randint(2, NT + 1, (n,), generator=g)[:, None]
    foils = torch.randn(n, NF, NT, IN, generator=g)
    foil_token_mask = torch.arange(NT)[None, None] < torch.randint(2, NT + 1, (n, NF), generator=g)[..., None]
    foil_mask = torch.rand(n, NF, generator=g) < 0.7
    foil_mask[0] = False  # a caption without any foil
    foil_mask[1] = True
    return tuple(t[rows] for t in (images, texts, mask, foils, foil_token_mask, foil_mask))


# -- references: loops over the pairs, as the method is written down ------------------------------


def choice_reference(positive: torch.Tensor, foils: list[torch.Tensor]) -> torch.Tensor:
    """-log p(own caption) among the own caption and its foils; 0 for a caption without foils."""
    if not foils:
        return positive * 0
    return -torch.log_softmax(torch.stack([positive, *foils]), 0)[0]


def clip_reference(out: EncoderOutput, choice_weight: float = 0.0) -> torch.Tensor:
    n, s = out.image_features.shape[0], out.logit_scale
    image_terms, text_terms, choices = [], [], []
    for i in range(n):
        row = [s * out.image_features[i] @ out.text_features[j] for j in range(n)]
        foils = [
            s * out.image_features[i] @ out.foil_text_features[i, f] for f in range(NF) if out.foil_mask[i, f]
        ]
        image_terms.append(-torch.log_softmax(torch.stack(row + foils), 0)[i])
        choices.append(choice_reference(row[i], foils))
        column = torch.stack([s * out.text_features[i] @ out.image_features[j] for j in range(n)])
        text_terms.append(-torch.log_softmax(column, 0)[i])
    contrastive = (torch.stack(image_terms).mean() + torch.stack(text_terms).mean()) / 2
    return contrastive + choice_weight * torch.stack(choices).mean()


def siglip_reference(out: EncoderOutput) -> torch.Tensor:
    n, s, b = out.image_features.shape[0], out.logit_scale, out.logit_bias
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = s * out.image_features[i] @ out.text_features[j] + b
            total = total - F.logsigmoid(z if i == j else -z)
        for f in range(NF):
            if out.foil_mask[i, f]:
                total = total - F.logsigmoid(-(s * out.image_features[i] @ out.foil_text_features[i, f] + b))
    return total / n


def late(image_tokens, text_tokens, text_mask) -> torch.Tensor:
    """FILIP's s_I: mean over image tokens of the best valid text token."""
    sims = image_tokens @ text_tokens[text_mask].T
    return sims.max(dim=1).values.mean()


def late_t2i(image_tokens, text_tokens, text_mask) -> torch.Tensor:
    return (text_tokens[text_mask] @ image_tokens.T).max(dim=1).values.mean()


def filip_reference(out: EncoderOutput, choice_weight: float = 0.0) -> torch.Tensor:
    n, s = out.image_features.shape[0], out.logit_scale
    it, tt, tm = out.image_tokens, out.text_tokens, out.text_token_mask
    image_terms, text_terms, choices = [], [], []
    for i in range(n):
        row = [s * late(it[i], tt[j], tm[j]) for j in range(n)]
        foils = [
            s * late(it[i], out.foil_text_tokens[i, f], out.foil_text_token_mask[i, f])
            for f in range(NF)
            if out.foil_mask[i, f]
        ]
        image_terms.append(-torch.log_softmax(torch.stack(row + foils), 0)[i])
        choices.append(choice_reference(row[i], foils))
        column = torch.stack([s * late_t2i(it[j], tt[i], tm[i]) for j in range(n)])
        text_terms.append(-torch.log_softmax(column, 0)[i])
    contrastive = (torch.stack(image_terms).mean() + torch.stack(text_terms).mean()) / 2
    return contrastive + choice_weight * torch.stack(choices).mean()


REFERENCES = {
    "clip": (lambda: ClipLoss(), clip_reference, False),
    "siglip": (lambda: SigLipLoss(), siglip_reference, True),
    "filip": (lambda: FilipLoss(chunk_size=3), filip_reference, False),
    # the foil choice term on top: the image's own caption against its foils alone
    "clip-choice": (
        lambda: ClipLoss(foil_choice_weight=0.7),
        partial(clip_reference, choice_weight=0.7),
        False,
    ),
    "filip-choice": (
        lambda: FilipLoss(chunk_size=3, foil_choice_weight=0.7),
        partial(filip_reference, choice_weight=0.7),
        False,
    ),
}


def loss_and_grads(loss_fn, siglip: bool, n: int, rows: slice = slice(None), make_batch=batch):
    model = Towers(siglip)
    out = model(*make_batch(n, rows))
    loss = loss_fn(out) if not hasattr(loss_fn, "loss_from_outputs") else loss_fn.loss_from_outputs(out)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_loss_is_the_references(make, reference, siglip: bool, make_batch=batch) -> torch.Tensor:
    """The loss `make()` builds and every gradient equal the loop reference's, on 2 x B rows;
    returns that loss."""
    loss, grads = loss_and_grads(make(), siglip, 2 * B, make_batch=make_batch)
    expected, expected_grads = loss_and_grads(reference, siglip, 2 * B, make_batch=make_batch)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad, atol=1e-5, rtol=1e-4, msg=key)
    return loss


@pytest.mark.parametrize("name", list(REFERENCES))
def test_foils_are_extra_negatives_of_their_own_image_as_the_reference_computes(name):
    make, reference, siglip = REFERENCES[name]
    loss = assert_loss_is_the_references(make, reference, siglip)
    # and the foils count: without them the loss is another one
    model = Towers(siglip)
    out = model(*batch(2 * B))
    without = EncoderOutput(*(getattr(out, f) for f in ("image_features", "text_features", "logit_scale",
                            "logit_bias", "image_tokens", "text_tokens", "text_token_mask")))  # fmt: skip
    # (SigLIP's negatives at its initial bias of -10 add about 5e-5 each)
    assert abs(make().loss_from_outputs(without).item() - loss.item()) > 1e-5


def test_captions_without_foils_leave_the_loss_as_it_was():
    model = Towers()
    out = model(*batch(2 * B))
    none = EncoderOutput(**{**out.__dict__, "foil_mask": torch.zeros_like(out.foil_mask)})
    plain = EncoderOutput(**{**out.__dict__, "foil_text_features": None, "foil_text_tokens": None})
    for loss in (
        ClipLoss(),
        FilipLoss(),
        ClipLoss(foil_choice_weight=1.0),
        FilipLoss(foil_choice_weight=1.0),
    ):
        assert loss.loss_from_outputs(none).item() == pytest.approx(
            loss.loss_from_outputs(plain).item(), abs=1e-6
        )


@pytest.mark.parametrize("make", [ClipLoss, FilipLoss])
def test_a_negative_foil_choice_weight_is_refused(make):
    with pytest.raises(ValueError, match=r"foil_choice_weight must be >= 0.*-0.5"):
        make(foil_choice_weight=-0.5)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"foil_choice_start_step": -1}, r"foil_choice_start_step must be an integer >= 0.*-1"),
        ({"foil_choice_ramp_steps": 2.5}, r"foil_choice_ramp_steps must be an integer >= 0.*2.5"),
        ({"foil_choice_ramp_steps": True}, r"foil_choice_ramp_steps must be an integer >= 0.*True"),
    ],
)
@pytest.mark.parametrize("make", [ClipLoss, FilipLoss])
def test_a_foil_choice_schedule_that_is_not_a_step_count_is_refused(make, bad, match):
    with pytest.raises(ValueError, match=match):
        make(foil_choice_weight=1.0, **bad)


@pytest.mark.parametrize(
    ("make", "reference"),
    [
        (partial(ClipLoss), clip_reference),
        (partial(FilipLoss, chunk_size=3), filip_reference),
    ],
    ids=["clip", "filip"],
)
def test_the_foil_choice_term_follows_its_schedule_over_the_trainers_steps(make, reference):
    """0 before the start step, then linear up to the weight over the ramp, then the weight."""
    loss_fn = make(foil_choice_weight=0.8, foil_choice_start_step=10, foil_choice_ramp_steps=4)
    for step, weight in [(0, 0.0), (9, 0.0), (10, 0.0), (11, 0.2), (12, 0.4), (14, 0.8), (500, 0.8)]:
        loss_fn.at_step(step)
        loss, grads = loss_and_grads(loss_fn, False, 2 * B)
        expected, expected_grads = loss_and_grads(partial(reference, choice_weight=weight), False, 2 * B)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5), step
        for key, grad in expected_grads.items():
            torch.testing.assert_close(grads[key], grad, atol=1e-5, rtol=1e-4, msg=f"{step} {key}")
    # no ramp: the whole weight from the start step on
    sudden = make(foil_choice_weight=0.8, foil_choice_start_step=3)
    for step, weight in [(2, 0.0), (3, 0.8)]:
        sudden.at_step(step)
        expected, _ = loss_and_grads(partial(reference, choice_weight=weight), False, 2 * B)
        assert loss_and_grads(sudden, False, 2 * B)[0].item() == pytest.approx(expected.item(), abs=1e-5)


# -- 2 gloo ranks ---------------------------------------------------------------------------------

CASES = {
    "clip-local-gradgather": (
        lambda r, w: ClipLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=w),
        False,
    ),
    "clip-global-gradgather": (lambda r, w: ClipLoss(gather_with_grad=True, rank=r, world_size=w), False),
    "siglip-bidir": (lambda r, w: SigLipLoss(rank=r, world_size=w), True),
    "siglip-gather": (lambda r, w: SigLipLoss(rank=r, world_size=w, dist_impl="gather"), True),
    "filip-local-gradgather": (
        lambda r, w: FilipLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=w, chunk_size=3),
        False,
    ),
    "filip-global-gradgather": (lambda r, w: FilipLoss(gather_with_grad=True, rank=r, world_size=w), False),
    # the ranks hold different numbers of captions with foils (batch() fixes rows 0 and 1)
    "clip-local-choice": (
        lambda r, w: ClipLoss(
            local_loss=True, gather_with_grad=True, rank=r, world_size=w, foil_choice_weight=2.0
        ),
        False,
    ),
    "filip-local-choice": (
        lambda r, w: FilipLoss(
            local_loss=True, gather_with_grad=True, rank=r, world_size=w, chunk_size=3, foil_choice_weight=2.0
        ),
        False,
    ),
}


@pytest.mark.slow
def test_two_ranks_with_foils_equal_one_process_on_the_global_batch(tmp_path):
    assert_two_ranks_equal_one_process("tests.test_losses_foils", tmp_path)


# -- the training module: foils encoded as captions are, in micro-batches too ----------------------


def _module_loss_and_grads(loss_name: str, micro_batches: int, images, text, foils, mask):
    torch.manual_seed(0)
    loss_cfg, model_settings = loss_file(loss_name)
    module = FlipLitModule({**MODEL, **model_settings}, loss_cfg, OPTIM, micro_batches=micro_batches)
    features = module(images, text, foils, mask)
    assert features.foil_text_features.shape[:2] == mask.shape
    assert (features.foil_text_tokens is not None) == module.criterion.requires_tokens
    losses = module.criterion(features)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return losses["loss"].detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["siglip", "clip_filip"])
def test_micro_batched_foils_equal_one_batch(loss_name):
    words = ["a hat", "glasses", "a beard", "bangs"]
    captions = [f"a person with {words[i % 4]}" for i in range(8)]
    foils = [[c.replace("with", "without"), c.replace("person", "child")] for c in captions]
    tokenizer = build_model("flip-test-tiny", TINY_ARCH)
    text = tokenizer.tokenize(captions)
    foil_tokens = tokenizer.tokenize([f for pair in foils for f in pair]).view(8, 2, -1)
    mask = torch.tensor([[True, i % 3 > 0] for i in range(8)])
    torch.manual_seed(1)
    images = torch.randn(8, 3, 32, 32)
    whole, whole_grads = _module_loss_and_grads(loss_name, 1, images, text, foil_tokens, mask)
    parts, grads = _module_loss_and_grads(loss_name, 4, images, text, foil_tokens, mask)
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=0)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)
