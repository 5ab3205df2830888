"""Load a trained FLIP model from a Lightning checkpoint, with nothing but the file."""

from __future__ import annotations

import os

import torch

from flip.models import FlipModel, build_model

MODEL_PREFIX = "model."


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> FlipModel:
    """Rebuild the model a checkpoint was trained with and load its weights (eval mode).

    Only tensors and plain containers are unpickled (`weights_only=True`): a checkpoint from an
    untrusted source cannot run code.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    try:
        hparams = checkpoint["hyper_parameters"]
        model_cfg, loss_cfg = hparams["model"], hparams["loss"]
    except KeyError as err:
        raise ValueError(
            f"{str(path)!r} is not a FLIP training checkpoint: it lacks hyper_parameters {err}; "
            "expected the .ckpt written by train.py"
        ) from None
    model = build_model(
        **{**model_cfg, "pretrained": None},  # the checkpoint holds the weights: never fetch them again
        init_logit_scale=loss_cfg.get("init_logit_scale"),
        init_logit_bias=loss_cfg.get("init_logit_bias"),
    )
    state = {
        key[len(MODEL_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    model.load_state_dict(state)
    return model.to(device).eval()
