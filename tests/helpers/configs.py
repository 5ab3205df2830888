"""The tiny model and data sizes every test trains at, and the real Hydra configs composed around them."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from .paths import CONF

# A model small enough that a training step takes milliseconds.
TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_OVERRIDES = [
    "model.name=flip-test-tiny",
    # the plain ViT, as TINY_ARCH builds it (tests/test_image_stem.py trains the demo's stem)
    "model.image_stem=null",
    "model.arch.embed_dim=32",
    "model.arch.vision_cfg.image_size=32",
    "model.arch.vision_cfg.width=32",
    "model.arch.vision_cfg.layers=1",
    "model.arch.vision_cfg.head_width=16",
    "model.arch.text_cfg.context_length=24",
    "model.arch.text_cfg.width=32",
    "model.arch.text_cfg.layers=1",
    "data.num_train=96",
    "data.num_val=32",
    "data.num_test=64",
    "data.samples_per_shard=32",
    "data.image_size=48",
    "data.batch_size=16",
    "data.val_batch_size=32",
    "data.num_workers=0",
    "data.generator_workers=1",
    "data.shuffle_buffer=32",
    "eval.batch_size=32",
    "eval.num_workers=0",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "optim.warmup_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "~callbacks.progress_bar",
]

# The tiny model on (image, caption) shards (data=shards) instead of FaceShapes, no evaluation.
_NOT_DATA = ("model", "trainer", "optim", "callbacks", "~callbacks")
SHARDS_BASE = [
    *(o for o in TINY_OVERRIDES if o.split(".")[0] in _NOT_DATA),
    "~experiment",
    "data=shards",
    "evaluate=false",
]


def loss_file(name: str) -> tuple[dict, dict]:
    """conf/loss/<name>.yaml as (the loss config, the model settings it makes): conf/loss/siglip.yaml
    sits at the top of the config (`# @package _global_`) to set SigLIP's temperature init too."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "loss" / f"{name}.yaml"))
    if "terms" in cfg:
        return cfg, {}
    return cfg["loss"], cfg.get("model", {})


# FlipLitModule's model and optim arguments, for tests that build the module without Hydra.
MODEL = {"name": "flip-test-tiny", "pretrained": None, "arch": TINY_ARCH}
OPTIM = {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6, "warmup_steps": 0}


def compose_train_config(
    tmp_path: Path, overrides: list[str] = (), base: list[str] = TINY_OVERRIDES
) -> DictConfig:
    """The real train.py config, as Hydra composes it, pointed at tmp_path.

    `base` comes first: the tiny model and FaceShapes sizes, or e.g. SHARDS_BASE for data=shards.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*base, *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig().set_config(cfg)
    return cfg


# finetune.py at test size: the tiny model (when no ckpt= is given), small batches, a few steps.
FINETUNE_BASE = [
    *(o for o in TINY_OVERRIDES if o.split(".")[0] in ("model", "~callbacks")),
    "data.batch_size=16",
    "data.val_batch_size=32",
    "data.num_workers=0",
    "eval.batch_size=32",
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "optim.warmup_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


def compose_finetune_config(
    tmp_path: Path, overrides: list[str] = (), base: list[str] = FINETUNE_BASE
) -> DictConfig:
    """The real finetune.py config, as Hydra composes it, with its run folder at tmp_path/run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=[*base, *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig().set_config(cfg)
    return cfg


def compose_eval(name: str, tmp_path: Path, *overrides: str) -> DictConfig:
    """An eval/*.py config (`name`: eval_zeroshot, eval_linear_probe, ...) as its script composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
    return cfg


def eval_overrides(tmp_path: Path, ckpt, benchmark: str, root, out: str = "out") -> list[str]:
    """An eval/*.py command line on a small benchmark: outputs and feature cache kept under tmp_path."""
    return [
        f"ckpt={ckpt}",
        f"benchmark={benchmark}",
        f"benchmark.root={root}",
        f"output_dir={tmp_path / out}",
        f"feature_cache_dir={tmp_path / 'cache'}",
        "num_workers=0",
        "batch_size=7",
    ]
