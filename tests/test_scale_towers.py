"""Towers at scale: initialising a tower from other weights, LiT and per-tower learning rates,
gradient checkpointing, torch.compile, timm image towers, bf16 autocast, and what happens to a
non-finite loss."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from flip.models import build_model
from flip.models.factory import tower_weight_flags
from flip.models.pretrained import load_tower, weightless
from flip.training.module import FlipLitModule
from flip.training.nonfinite import NonFiniteLossError
from flip.training.optim import build_optimizer, warmup_cosine
from flip.training.run import train

from .helpers import (
    CONF,
    MODEL,
    OPTIM,
    SHARDS_BASE,
    TINY_ARCH,
    NaNLoss,
    compose_train_config,
    fit_briefly,
    loss_file,
    random_batch,
    write_caption_shards,
)

CLIP_LOSS = loss_file("clip")[0]


def _split(state: dict) -> tuple[dict, dict]:
    image = {k: v for k, v in state.items() if k.startswith("visual.")}
    text = {k: v for k, v in state.items() if not k.startswith("visual.") and "logit" not in k}
    return image, text


# ---------------------------------------------------------------- initialising towers


@pytest.mark.parametrize("form", ["open_clip_file", "name_and_tag", "flip_ckpt"])
def test_image_tower_from_other_weights_and_text_tower_untouched(tmp_path, form):
    torch.manual_seed(1)
    source = build_model("flip-test-tiny", TINY_ARCH).clip.state_dict()
    if form == "flip_ckpt":
        path = tmp_path / "run.ckpt"
        torch.save(
            {
                "hyper_parameters": {"model": MODEL},
                "state_dict": {f"model.clip.{k}": v for k, v in source.items()},
            },
            path,
        )
        spec = {"checkpoint": str(path)}
    else:
        path = tmp_path / "open_clip.pt"
        torch.save(source, path)
        # open_clip resolves `pretrained` (a tag, or a file as here) for the named architecture
        spec = (
            {"checkpoint": str(path)}
            if form == "open_clip_file"
            else {"name": "flip-test-tiny", "pretrained": str(path)}
        )
    torch.manual_seed(2)
    model = build_model("flip-test-tiny", TINY_ARCH)
    before_text = _split(copy.deepcopy(model.clip.state_dict()))[1]
    assert load_tower(model, "image", spec) == len(_split(source)[0])
    image, text = _split(model.clip.state_dict())
    for key, value in _split(source)[0].items():
        torch.testing.assert_close(image[key], value, rtol=0, atol=0)
    for key, value in before_text.items():
        torch.testing.assert_close(text[key], value, rtol=0, atol=0)


def test_a_new_joint_size_keeps_the_projection_and_other_mismatches_are_refused(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(build_model("flip-test-tiny", TINY_ARCH).clip.state_dict(), path)
    other_joint = {**copy.deepcopy(TINY_ARCH), "embed_dim": 16}
    model = build_model("flip-test-tiny-16", other_joint)
    proj = model.clip.visual.proj.detach().clone()
    loaded = load_tower(model, "image", {"checkpoint": str(path)})
    assert torch.equal(model.clip.visual.proj, proj)  # 32 -> 16 projection: kept, everything else loaded
    assert loaded == len(_split(model.clip.state_dict())[0]) - 1
    deeper = copy.deepcopy(TINY_ARCH)
    deeper["vision_cfg"]["layers"] = 2
    with pytest.raises(ValueError, match=r"does not fit this image tower.*resblocks\.1"):
        load_tower(build_model("flip-test-tiny-deep", deeper), "image", {"checkpoint": str(path)})
    with pytest.raises(ValueError, match=r"\{name: <open_clip model>"):
        load_tower(model, "text", {"weights": "x"})


def test_weights_trained_with_another_activation_are_refused_naming_the_switch(tmp_path):
    """OpenAI's CLIP weights (QuickGELU) into a GELU tower fit tensor for tensor; only the
    activation tells them apart, so that is what load_tower checks for a named source."""
    quick = {**copy.deepcopy(TINY_ARCH), "quick_gelu": True}
    path = tmp_path / "quick.pt"
    torch.save(build_model("flip-test-tiny-quick", quick).clip.state_dict(), path)
    spec = {"name": "flip-test-tiny-quick", "pretrained": str(path)}
    with pytest.raises(ValueError, match=r"trained with QuickGELU.*uses GELU.*model\.arch\.quick_gelu=true"):
        load_tower(build_model("flip-test-tiny", TINY_ARCH), "image", spec)
    model = build_model("flip-test-tiny-quick", quick)
    # the same activation: loads
    assert load_tower(model, "text", spec) == len(_split(model.clip.state_dict())[1])
    with pytest.raises(ValueError, match=r"trained with GELU.*uses QuickGELU.*quick_gelu=false"):
        load_tower(model, "image", {"name": "flip-test-tiny", "pretrained": None})


def test_the_vit_b16_bert_config_computes_what_openai_weights_were_trained_for():
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    model = OmegaConf.load(CONF / "model" / "vit_b16_bert.yaml")
    init = model.image_init
    assert init.name in open_clip.list_models()
    trained_with = get_pretrained_cfg(init.name, init.pretrained)["quick_gelu"]
    assert model.arch.get("quick_gelu", False) == trained_with


def test_tower_init_is_applied_by_the_module_and_kept_out_of_the_rebuild_recipe(tmp_path):
    path = tmp_path / "text.pt"
    torch.manual_seed(3)
    source = build_model("flip-test-tiny", TINY_ARCH).clip.state_dict()
    torch.save(source, path)
    module = FlipLitModule({**MODEL, "text_init": {"checkpoint": str(path)}}, CLIP_LOSS, OPTIM)
    torch.testing.assert_close(module.model.clip.text_projection, source["text_projection"], rtol=0, atol=0)
    assert "text_init" not in module.hparams.model and module.hparams.model_init["text_init"]
    assert weightless({**MODEL, "pretrained": "openai"})["pretrained"] is None


# ---------------------------------------------------------------- LiT, per-tower rates


def test_lit_freezes_the_image_tower_and_towers_get_their_own_rates():
    optim = {**OPTIM, "lock_image": True, "lr_text": 4e-3, "warmup_steps": 2}
    module = FlipLitModule(MODEL, CLIP_LOSS, optim)
    visual = dict(module.model.clip.visual.named_parameters())
    assert not any(p.requires_grad for p in visual.values())
    optimizer = build_optimizer(module.model, optim)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates == {"temperature_no_decay": 1e-3, "text": 4e-3, "text_no_decay": 4e-3}  # no image group
    frozen = {k: v.detach().clone() for k, v in visual.items()}
    text_before = module.model.clip.text_projection.detach().clone()
    schedule = warmup_cosine(optimizer, warmup_steps=2, total_steps=10)
    losses = module.criterion(module(*random_batch(module.model)))
    losses["loss"].backward()
    optimizer.step()
    schedule.step()
    assert all(torch.equal(visual[k], v) for k, v in frozen.items())
    assert not torch.equal(module.model.clip.text_projection, text_before)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates["text"] / rates["temperature_no_decay"] == pytest.approx(4.0)  # the schedule keeps the ratio


def test_lit_can_leave_the_last_image_groups_trainable():
    module = FlipLitModule(MODEL, CLIP_LOSS, {**OPTIM, "lock_image": True, "lock_image_unlocked_groups": 1})
    trainable = {n for n, p in module.model.clip.visual.named_parameters() if p.requires_grad}
    assert trainable == {"proj"}  # the last group of open_clip's ViT is its projection


# ---------------------------------------------------------------- memory and speed switches


def test_gradient_checkpointing_is_set_in_both_towers_and_changes_no_gradient():
    torch.manual_seed(4)
    plain = FlipLitModule(MODEL, CLIP_LOSS, OPTIM)
    torch.manual_seed(4)
    checkpointed = FlipLitModule(MODEL, CLIP_LOSS, OPTIM, grad_checkpointing=True)
    assert checkpointed.model.clip.visual.transformer.grad_checkpointing
    assert checkpointed.model.clip.transformer.grad_checkpointing
    assert not plain.model.clip.transformer.grad_checkpointing
    batch = random_batch(plain.model)
    grads = []
    for module in (plain, checkpointed):
        module.train()
        module.criterion(module(*batch))["loss"].backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("towers", [("vision",), ("text",), ("vision", "text")])
def test_gradient_checkpointing_of_custom_blocks_is_refused_with_the_setting_that_works(towers):
    # open_clip's checkpoint calls each block with its default block's arguments (a TypeError in
    # the first forward of a batch-first custom block, the demo's): refused when the module is built
    arch = {
        **MODEL["arch"],
        **{f"{t}_cfg": {**MODEL["arch"][f"{t}_cfg"], "block_type": "custom"} for t in towers},
    }
    model = {**MODEL, "arch": arch}
    FlipLitModule(model, CLIP_LOSS, OPTIM)  # without checkpointing the blocks are fine
    expected = " and ".join(f"model.arch.{t}_cfg.block_type=default" for t in towers)
    with pytest.raises(ValueError, match=rf"grad_checkpointing=true: .* set {expected} "):
        FlipLitModule(model, CLIP_LOSS, OPTIM, grad_checkpointing=True)


@pytest.mark.slow
def test_compile_runs_the_towers_through_torch_compile():
    module = FlipLitModule(MODEL, CLIP_LOSS, OPTIM, compile={"backend": "eager"})
    names = [n for n, _ in module.model.named_parameters()]
    trainer = fit_briefly(module, steps=2)
    assert module.model._compiled_call_impl is not None  # nn.Module.compile: in place
    assert [n for n, _ in module.model.named_parameters()] == names  # checkpoints keep their keys
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


# ---------------------------------------------------------------- non-finite losses


@pytest.mark.slow
def test_a_non_finite_loss_skips_its_step(caplog):
    torch.manual_seed(5)
    module = FlipLitModule(MODEL, CLIP_LOSS, OPTIM)
    poison = NaNLoss(steps={1})
    trainer = fit_briefly(module, [poison], steps=3)
    assert module.nonfinite.skipped == 1 and "non-finite loss at step 1" in caplog.text
    # step 0 trained; step 1 (NaN) changed nothing; after it training went on
    after_skip = poison.weights.get(2) or {k: v for k, v in module.model.state_dict().items()}
    for key, value in poison.weights[1].items():
        torch.testing.assert_close(after_skip[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(
        poison.weights[1]["clip.text_projection"], poison.weights[0]["clip.text_projection"]
    )
    assert trainer.callback_metrics["train/skipped_steps"] == 1
    assert torch.isfinite(module.model.clip.text_projection).all()


@pytest.mark.slow
def test_repeated_non_finite_losses_stop_the_run_with_what_to_do():
    module = FlipLitModule(MODEL, CLIP_LOSS, OPTIM, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 steps in a row.*optim.lr.*ckpt_path"):
        fit_briefly(module, [NaNLoss()], steps=10)
    with pytest.raises(ValueError, match="max_nonfinite_steps must be an integer >= 1, got 0"):
        FlipLitModule(MODEL, CLIP_LOSS, OPTIM, max_nonfinite_steps=0)


# ---------------------------------------------------------------- timm towers, precision


def test_timm_image_tower_through_open_clip():
    arch = copy.deepcopy(TINY_ARCH)
    arch["vision_cfg"] = {"timm_model_name": "test_resnet", "timm_model_pretrained": False,
                          "timm_pool": "avg", "timm_proj": "linear", "image_size": 32}  # fmt: skip
    model = build_model("flip-test-timm", arch)
    assert type(model.clip.visual).__name__ == "TimmModel"
    assert tower_weight_flags("flip-test-timm") == {"pretrained_image": False}
    features = model.encode_image(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 32) and torch.isfinite(features).all()
    recipe = weightless(
        {"name": "x", "arch": {**arch, "vision_cfg": {**arch["vision_cfg"], "timm_model_pretrained": True}}}
    )
    assert recipe["arch"]["vision_cfg"]["timm_model_pretrained"] is False


@pytest.mark.slow
def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    shards = write_caption_shards(tmp_path / "shards", count=32, per_shard=32)[0]
    overrides = [f"data.train_shards={shards}", "data.batch_size=8", "data.num_workers=0",
                 "data.shuffle_buffer=8", "trainer.precision=bf16-mixed", "trainer.max_steps=2",
                 "trainer.val_check_interval=null", "trainer.gradient_clip_val=1.0"]  # fmt: skip
    results = train(compose_train_config(tmp_path, overrides, SHARDS_BASE))
    assert torch.isfinite(torch.tensor(results["train"]["train/loss"]))
