import itertools
import math

import pytest
import torch

from flip.training.optim import parameter_groups, warmup_cosine


def test_weight_decay_skips_gains_biases_embeddings_of_position_and_temperature(tiny_model):
    decay, no_decay = parameter_groups(tiny_model, weight_decay=0.1)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "clip.logit_scale" in skipped and "clip.positional_embedding" in skipped
    assert all(p.ndim >= 2 for p in decay["params"])
    assert not any("bias" in n or ".ln" in n for n in decayed)
    assert "clip.visual.transformer.resblocks.0.mlp.c_fc.weight" in decayed
    assert len(decayed) + len(skipped) == len(list(tiny_model.parameters()))


def test_warmup_then_cosine_to_the_floor():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    rates = []
    for _ in range(120):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert rates[110] == pytest.approx(0.1) and rates[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_is_fused_when_the_config_says_so_and_steps_as_the_unfused_one(tiny_model, fused):
    from flip.training.optim import build_optimizer

    optim = {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6, "fused": fused}
    optimizer = build_optimizer(tiny_model, optim)
    assert all(bool(group["fused"]) is fused for group in optimizer.param_groups)
    reference = build_optimizer(tiny_model, {**optim, "fused": False})
    assert optimizer.param_groups[0]["weight_decay"] == reference.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize(
    ("precision", "clip", "fused"),
    [("bf16-mixed", None, True), ("bf16-mixed", 1.0, False), ("32-true", 1.0, True)],
)
def test_fused_adamw_gives_way_only_where_lightning_cannot_clip_it(precision, clip, fused):
    from flip.training.module import FlipLitModule

    from .helpers import MODEL, OPTIM, fit_briefly, loss_file

    module = FlipLitModule(MODEL, loss_file("clip")[0], {**OPTIM, "fused": True})
    trainer = fit_briefly(module, steps=2, precision=precision, gradient_clip_val=clip)
    assert bool(trainer.optimizers[0].param_groups[0]["fused"]) is fused
    assert trainer.global_step == 2
