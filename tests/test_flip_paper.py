"""experiment=flip_paper (FLIP's published recipe) composes and validates without a GPU, holds FLIP's
values, builds on flip_vit_b16_bert's towers; its tiny twin trains here."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from flip.config import register_resolvers
from flip.training.run import train, validate

from .helpers import compose_train_config, csv_losses

SHARDS = "data.train_shards=/data/facecaption15m"


def _compose(tmp_path, *overrides: str):
    cfg = compose_train_config(tmp_path, list(overrides), base=[])
    register_resolvers()
    return cfg


def test_flip_paper_holds_flips_published_values_and_validates(tmp_path):
    cfg = _compose(tmp_path, "experiment=flip_paper", SHARDS)
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(plain, resolve=True, throw_on_missing=True)  # every value given
    validate(cfg)
    itc = cfg.loss.terms.itc.loss
    assert list(cfg.loss.terms) == ["itc", "itm"] and itc._target_ == "flip.losses.MomentumItcLoss"
    assert cfg.loss.terms.itm.loss._target_ == "flip.losses.ItmLoss" and cfg.model.fusion.style == "auto"
    assert (itc.queue_size, itc.momentum, itc.alpha) == (61440, 0.995, 0.4)
    assert (itc.min_temperature, itc.max_temperature) == (0.001, 0.5)
    assert cfg.data.batch_size == 80 and cfg.data.captions is None
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.lr_image) == (3e-5, 0.05, None)
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps) == (15, -1)
    arch = cfg.model.arch
    assert (arch.embed_dim, arch.text_cfg.context_length) == (256, 65)
    assert arch.text_cfg.hf_model_name == "bert-base-uncased"
    assert (cfg.model.image_init.name, cfg.model.image_init.pretrained) == ("ViT-B-16", "openai")
    assert cfg.model.init_logit_scale == pytest.approx(math.log(1 / 0.07))  # FLIP's temperature 0.07
    # the queue takes whole global batches of 80 on the GPU counts FLIP-sized jobs use
    loss = instantiate(itc)
    for gpus in (1, 2, 4, 8, 16):
        assert loss.queue_size % (80 * gpus) == 0, gpus


def test_flip_paper_builds_on_flip_vit_b16_bert_and_changes_only_the_recipe(tmp_path):
    paper = _compose(tmp_path, "experiment=flip_paper", SHARDS)
    base = _compose(tmp_path, "experiment=flip_vit_b16_bert", SHARDS)
    # the same towers, said once (conf/model/vit_b16_bert.yaml), plus ITM's fusion encoder
    towers = OmegaConf.masked_copy(paper.model, [k for k in paper.model if k != "fusion"])
    assert towers == base.model and "fusion" not in base.model
    assert paper.callbacks.model_checkpoint == base.callbacks.model_checkpoint
    assert (paper.trainer.precision, paper.evaluate) == (base.trainer.precision, base.evaluate)
    assert base.loss.terms.keys() == {"clip"} and base.data.batch_size == 256


@pytest.mark.slow
def test_the_tiny_twin_trains_a_few_steps_with_flips_loss(tmp_path):
    # the tests' tiny sizes (batch 16, 4 steps) on top of the twin; its queue holds 1280 = 80 x 16
    cfg = compose_train_config(tmp_path, ["experiment=flip_paper_tiny", "evaluate=false"])
    assert cfg.loss.terms.itc.loss.queue_size % cfg.data.batch_size == 0
    assert OmegaConf.select(cfg, "hydra.runtime.choices.model") == "tiny"
    results = train(cfg)
    assert {k for k in results["train"] if k.startswith("train/") and "logit" not in k} >= {
        "train/itc",
        "train/itm",
        "train/loss",
    }
    losses = csv_losses(tmp_path / "run")
    assert sorted(losses) == [0, 1, 2, 3] and all(torch.isfinite(torch.tensor(list(losses.values()))))


def test_the_tiny_twin_composes_as_the_recipe_on_faceshapes(tmp_path):
    twin = _compose(tmp_path, "experiment=flip_paper_tiny")
    paper = _compose(tmp_path, "experiment=flip_paper", SHARDS)
    validate(twin)
    choices = twin.hydra.runtime.choices
    picked = (choices.model, choices.data, choices.loss, choices.trainer)
    assert picked == ("tiny", "faceshapes", "itc_queue_itm", "cpu")
    for key in ("momentum", "alpha", "min_temperature", "max_temperature"):
        assert twin.loss.terms.itc.loss[key] == paper.loss.terms.itc.loss[key]
    assert twin.loss.terms.itc.loss.queue_size == 16 * twin.data.batch_size
    for key in ("weight_decay", "betas", "eps"):
        assert twin.optim[key] == paper.optim[key]
    assert twin.data.batch_size == paper.data.batch_size and twin.evaluate


def test_the_documented_caption_mix_reaches_the_data_module(tmp_path):
    mix = "data.captions={fields:{caption:0.7,laion_caption:0.3},sentences:one}"
    module = instantiate(_compose(tmp_path, "experiment=flip_paper", SHARDS, mix).data)
    assert module.captions.fields == {"caption": 0.7, "laion_caption": 0.3}
    assert module.captions.sentences == "one" and module.captions.needs_json
    assert instantiate(_compose(tmp_path, "experiment=flip_paper", SHARDS).data).captions is None
