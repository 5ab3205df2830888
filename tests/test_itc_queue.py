"""loss=itc_queue (momentum ITC with queues): ALBEF's soft targets and loss against a direct
computation, the EMA against a hand-computed one, no gradient into the queue or the momentum copy,
exact resume through train.py, DeepSpeed ZeRO-2 trains with it and ZeRO-3 is refused before any
work. The 2-rank queue test is in test_itc_queue_distributed.py."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import flip
from flip.losses import MomentumItcLoss, build_loss
from flip.losses.itc_queue import distilled_targets
from flip.training.deepspeed import consolidate
from flip.training.module import FlipLitModule
from flip.training.run import train, validate

from .helpers import (
    MODEL,
    OPTIM,
    SHARDS_BASE,
    TINY_OVERRIDES,
    compose_train_config,
    csv_losses,
    fit_briefly,
    loss_file,
    run_train_py,
    write_caption_shards,
)
from .test_itc_queue_distributed import D_IN, D, Towers
from .test_resume import Interrupted


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def reference_loss(img, txt, m_img, m_txt, q_img, q_txt, scale: float, alpha: float) -> float:
    """ALBEF's ITC written out: rows against [momentum batch; queue], one row at a time, in float64."""

    def direction(rows, m_rows, columns) -> float:
        total = 0.0
        for i in range(len(rows)):
            m_logits = [scale * float(m_rows[i] @ c) for c in columns]
            top = max(m_logits)
            weights = [math.exp(v - top) for v in m_logits]
            targets = [alpha * w / sum(weights) + (1 - alpha) * (j == i) for j, w in enumerate(weights)]
            logits = [scale * float(rows[i] @ c) for c in columns]
            top = max(logits)
            log_norm = top + math.log(sum(math.exp(v - top) for v in logits))
            total -= sum(t * (v - log_norm) for t, v in zip(targets, logits, strict=True))
        return total / len(rows)

    text_columns = [*m_txt.double(), *q_txt.double()]
    image_columns = [*m_img.double(), *q_img.double()]
    return (
        direction(img.double(), m_img.double(), text_columns)
        + direction(txt.double(), m_txt.double(), image_columns)
    ) / 2


def queued_loss(queue_size: int = 8, alpha: float = 0.4, b: int = 4, fill: int = 2) -> MomentumItcLoss:
    """A loss whose queue holds `fill` batches of random momentum features (in eval: left alone)."""
    loss = MomentumItcLoss(queue_size=queue_size, alpha=alpha)
    for step in range(fill):
        loss.enqueue(unit(b, D, seed=100 + step), unit(b, D, seed=200 + step))
    return loss.eval()


# ---------------------------------------------------------------- the loss against a direct computation


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("fill", [0, 1, 3])  # empty, partly filled, wrapped around
def test_loss_equals_albef_written_out(alpha, fill):
    loss = queued_loss(alpha=alpha, fill=fill)
    filled = min(fill * 4, 8)
    assert int(loss.queue_filled) == filled and int(loss.queue_ptr) == fill * 4 % 8
    img, txt, m_img, m_txt = (unit(4, D, seed=s) for s in range(4))
    scale = torch.tensor(1 / 0.07)
    got = loss(img, txt, scale, m_img, m_txt)
    q_img, q_txt = loss.image_queue[:filled], loss.text_queue[:filled]
    assert got.item() == pytest.approx(
        reference_loss(img, txt, m_img, m_txt, q_img, q_txt, 1 / 0.07, alpha), rel=1e-5
    )
    if alpha == 0.0:  # one-hot targets: InfoNCE against batch + queue
        plain = (
            F.cross_entropy(scale * img @ torch.cat([m_txt, q_txt]).T, torch.arange(4))
            + F.cross_entropy(scale * txt @ torch.cat([m_img, q_img]).T, torch.arange(4))
        ) / 2
        assert got.item() == pytest.approx(plain.item(), rel=1e-6)


def test_soft_targets_mix_the_momentum_softmax_with_the_pairs():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    targets = distilled_targets(logits, 0.4)
    for i in range(3):
        exps = [math.exp(v) for v in logits[i].tolist()]
        for j in range(7):
            assert targets[i, j].item() == pytest.approx(0.4 * exps[j] / sum(exps) + 0.6 * (i == j), rel=1e-6)
    torch.testing.assert_close(targets.sum(1), torch.ones(3))


def test_the_temperature_is_the_models_clamped_to_flips_range():
    loss = queued_loss(alpha=0.4, fill=1)
    img, txt, m_img, m_txt = (unit(4, D, seed=s) for s in range(4))
    q_img, q_txt = loss.image_queue[:4], loss.text_queue[:4]
    for given, used in ((1.0, 2.0), (5000.0, 1000.0), (30.0, 30.0)):  # temperature 1 -> 0.5, 0.0002 -> 0.001
        got = loss(img, txt, torch.tensor(given), m_img, m_txt).item()
        assert got == pytest.approx(reference_loss(img, txt, m_img, m_txt, q_img, q_txt, used, 0.4), rel=1e-5)


def test_alpha_warms_up_over_the_first_optimizer_steps():
    loss = MomentumItcLoss(queue_size=8, alpha=0.4, alpha_warmup_steps=4)
    model = Towers()
    loss.bind(model)
    seen = []
    for _ in range(6):
        seen.append(loss.current_alpha())
        loss.after_optimizer_step(model)
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])


# ---------------------------------------------------------------- gradients, the EMA, the queue's rules


def test_the_config_builds_the_term_for_its_rank():
    loss = build_loss(loss_file("itc_queue")[0], rank=1, world_size=4)
    term = loss.terms["itc"]
    assert isinstance(term, MomentumItcLoss) and loss.weights == {"itc": 1.0}
    settings = (term.rank, term.world_size, term.queue_size, term.momentum, term.alpha)
    assert settings == (1, 4, 4096, 0.995, 0.4)
    assert loss.requires_inputs and not loss.requires_tokens
    assert term.queue_size % 128 == 0  # the demo's batch


def test_no_gradient_reaches_the_queue_or_the_momentum_copy():
    model, criterion = Towers(), build_loss(loss_file("itc_queue")[0])
    criterion.bind(model)
    term = criterion.terms["itc"]
    term.enqueue(unit(4, D, seed=1), unit(4, D, seed=2))
    images, text = torch.randn(4, D_IN), torch.randn(4, D_IN)
    losses = criterion(model(images, text), images, text)
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in term.momentum_model.parameters())
    assert not any(b.requires_grad for b in term.buffers())
    assert int(term.queue_filled) == 8  # training mode: the batch was enqueued after the loss


class Recorder(L.Callback):
    """The online weights after every optimizer step."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.after.append({k: v.detach().clone() for k, v in module.model.named_parameters()})


def test_the_momentum_copy_is_the_ema_of_the_online_weights():
    cfg = loss_file("itc_queue")[0]
    cfg["terms"]["itc"]["loss"]["queue_size"] = 12  # batches of 6
    module = FlipLitModule(MODEL, cfg, OPTIM)
    expected = {k: v.detach().clone().double() for k, v in module.model.named_parameters()}
    recorder = Recorder()
    trainer = fit_briefly(module, [recorder], steps=3)
    trained = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in trained for p in module.criterion.terms["itc"].momentum_model.parameters())
    for online in recorder.after:  # ALBEF's formula, step by step
        expected = {k: 0.995 * expected[k] + 0.005 * online[k].double() for k in expected}
    momentum = dict(module.criterion.terms["itc"].momentum_model.named_parameters())
    moved = [k for k in expected if not torch.equal(momentum[k], recorder.after[0][k])]
    assert len(moved) > len(expected) // 2
    for name, value in expected.items():
        torch.testing.assert_close(momentum[name].double(), value, rtol=0, atol=1e-6)


def test_a_queue_that_is_not_a_multiple_of_the_global_batch_is_refused():
    loss = MomentumItcLoss(queue_size=10)
    with pytest.raises(
        ValueError,
        match=r"queue_size=10 must be a multiple of the global batch \(4 = 4 per rank x 1 ranks\).*e\.g\. 8",
    ):
        loss.enqueue(unit(4, D, seed=0), unit(4, D, seed=1))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("queue_size", 0, "queue_size must be a positive integer"),
     ("momentum", 1.0, r"momentum must be in \[0, 1\)"), ("alpha", 1.5, r"alpha must be in \[0, 1\]"),
     ("min_temperature", 0.0, "need 0 < min_temperature")],
)  # fmt: skip
def test_bad_settings_are_refused_by_name(key, value, message):
    with pytest.raises(ValueError, match=message):
        MomentumItcLoss(**{key: value})


def test_validation_leaves_the_queue_alone():
    loss, model = MomentumItcLoss(queue_size=8), Towers()
    loss.bind(model)
    loss.eval()
    images, text = torch.randn(4, D_IN), torch.randn(4, D_IN)
    loss.loss_from_outputs(model(images, text), loss.encode_inputs(images, text))
    assert int(loss.queue_filled) == 0 and int(loss.queue_ptr) == 0
    assert not loss.momentum_model.training
    loss.train()
    assert not loss.momentum_model.training  # the teacher stays in eval mode


# ---------------------------------------------------------------- train.py: exact resume, DeepSpeed


def _overrides(shards: Path) -> list[str]:
    return [
        f"data.train_shards={shards}", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16",
        "data.samples_per_epoch=100000", "trainer.max_steps=6", "trainer.val_check_interval=null",
        "callbacks.model_checkpoint.every_n_train_steps=1", "optim.warmup_steps=2", "loss=itc_queue",
        "loss.terms.itc.loss.queue_size=16", "loss.terms.itc.loss.alpha_warmup_steps=3",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_resumed_run_has_the_same_queues_momentum_copy_and_losses_as_an_uninterrupted_one(tmp_path):
    shards = Path(write_caption_shards(tmp_path / "shards", count=80, per_shard=20)[0]).parent
    overrides = _overrides(shards)
    train(compose_train_config(tmp_path / "whole", overrides, SHARDS_BASE))
    crash = "+callbacks.crash={_target_: tests.test_resume.InterruptAt, step: 3}"
    with pytest.raises(Interrupted):
        train(compose_train_config(tmp_path / "split", [*overrides, crash], SHARDS_BASE))
    last = tmp_path / "split" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    train(compose_train_config(tmp_path / "split", [*overrides, f"ckpt_path={last}"], SHARDS_BASE))
    whole, split = (
        torch.load(tmp_path / run / "run" / "checkpoints" / "last.ckpt", weights_only=True)
        for run in ("whole", "split")
    )
    assert whole["global_step"] == split["global_step"] == 6
    term = "criterion.terms.itc."
    assert int(whole["state_dict"][term + "queue_filled"]) == 16  # the queue wrapped around
    for key, value in whole["state_dict"].items():  # queues, pointer, momentum copy, online model
        assert torch.equal(value, split["state_dict"][key]), key
    assert any(k.startswith(term + "momentum_model.") for k in whole["state_dict"])
    model = flip.load(tmp_path / "whole" / "run" / "checkpoints" / "last.ckpt")  # the online model only
    for key, value in model.state_dict().items():
        assert torch.equal(value, whole["state_dict"]["model." + key]), key
    before, after = csv_losses(tmp_path / "split" / "run", 0), csv_losses(tmp_path / "split" / "run", 1)
    assert sorted(before) == [0, 1, 2] and sorted(after) == [3, 4, 5]
    assert {**before, **after} == csv_losses(tmp_path / "whole" / "run")


def test_zero3_is_refused_before_any_work_and_zero2_validates(train_config):
    with pytest.raises(
        ValueError,
        match=r"loss.terms.itc \(flip.losses.MomentumItcLoss\) keeps a momentum copy.*deepspeed_zero2",
    ):
        validate(train_config("loss=itc_queue", "trainer=deepspeed_zero3"))
    validate(train_config("loss=itc_queue", "trainer=deepspeed_zero2"))


def test_hard_negatives_with_no_term_that_reads_foils_are_refused_before_any_work(train_config):
    with pytest.raises(
        ValueError, match=r"data.hard_negatives='auto', but no term of this loss .*itc.*loss=clip_filip"
    ):
        validate(train_config("loss=itc_queue", "data.hard_negatives=auto"))
    validate(train_config("loss=clip_filip", "data.hard_negatives=auto"))
    validate(train_config("loss=siglip", "data.hard_negatives=auto"))


def test_a_foil_choice_weight_without_foils_is_refused_before_any_work(train_config):
    weighted = "loss.terms.filip.loss.foil_choice_weight=1.0"
    with pytest.raises(
        ValueError, match=r"loss.terms.filip.loss.foil_choice_weight is set, but data.hard_negatives is None"
    ):
        validate(train_config("loss=clip_filip", weighted))
    validate(train_config("loss=clip_filip", weighted, "data.hard_negatives=auto"))


@pytest.mark.slow
def test_deepspeed_zero2_trains_checkpoints_and_resumes_with_it(train_config, tmp_path, deepspeed_on_cpu):
    def run(steps: int, *more: str) -> dict:
        train(train_config(
            "trainer=deepspeed_zero2", "trainer.accelerator=cpu", "trainer.devices=1",
            "trainer.precision=32-true", "loss=itc_queue", "loss.terms.itc.loss.queue_size=48",
            "evaluate=false", "callbacks.model_checkpoint.every_n_train_steps=1",
            f"trainer.max_steps={steps}", *more,
        ))  # fmt: skip
        return consolidate(last, tmp_path / f"step{steps}.ckpt")["state_dict"]

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = run(2)
    second = run(4, f"ckpt_path={last}")
    term = "criterion.terms.itc."
    counters = [[int(s[term + n]) for n in ("queue_filled", "queue_ptr", "updates")] for s in (first, second)]
    assert counters == [[32, 32, 2], [48, 64 % 48, 4]]  # batches of 16; resumed where it stopped
    # the rows written before the checkpoint survived the resume; the wrapped-around ones changed
    assert torch.equal(first[term + "image_queue"][16:32], second[term + "image_queue"][16:32])
    assert not torch.equal(first[term + "image_queue"][:16], second[term + "image_queue"][:16])
    weight = "clip.visual.conv1.weight"
    momentum, online = second[term + "momentum_model." + weight], second["model." + weight]
    assert not torch.equal(momentum, first[term + "momentum_model." + weight])
    assert not torch.equal(momentum, online)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_through_train_py_fills_the_queue_with_the_global_batches(tmp_path):
    shards = write_caption_shards(tmp_path / "shards", count=128, per_shard=64)
    overrides = [o for o in TINY_OVERRIDES if o.startswith(("model.", "trainer.enable", "optim."))] + [
        "~experiment", "trainer=ddp", "trainer.devices=2", "trainer.max_steps=3", "loss=itc_queue",
        "loss.terms.itc.loss.queue_size=64", "data=shards", f"data.train_shards={Path(shards[0]).parent}",
        "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=64", "evaluate=false",
        "callbacks.model_checkpoint.every_n_train_steps=3", "~callbacks.progress_bar",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    done = run_train_py(*overrides, flip_root=tmp_path, threads=1)
    assert "MEMBER: 2/2" in done.stdout + done.stderr
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    term = "criterion.terms.itc."
    # 3 global batches of 2 x 16: the queue of 64 wrapped once, the pointer after the third batch
    counters = [int(saved[term + name]) for name in ("queue_filled", "queue_ptr", "updates")]
    assert counters == [64, 32, 3]
    norms = saved[term + "image_queue"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(64))  # every row written with a unit feature
    weight = "clip.visual.conv1.weight"
    assert not torch.equal(saved[term + "momentum_model." + weight], saved["model." + weight])
