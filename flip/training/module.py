"""The Lightning module: towers + contrastive loss + AdamW/cosine.

Hyperparameters are saved as plain dicts so that checkpoints load with `weights_only=True`
and a model can be rebuilt from its checkpoint alone (`flip.load`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.checkpoint import checkpoint

from flip.losses import build_loss
from flip.models import EncoderOutput, FlipModel, build_model
from flip.training.optim import parameter_groups, warmup_cosine

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learnable temperature at 1/100


def plain(cfg: Any) -> Any:
    """OmegaConf nodes to plain containers (checkpoint-safe, JSON-safe)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class FlipLitModule(L.LightningModule):
    """`micro_batches` > 1 trains on batches larger than memory allows, keeping every negative.

    Each batch is encoded in that many micro-batches whose activations are not kept but
    recomputed during backward (non-reentrant checkpointing); the loss sees the features of
    the whole batch at once. Loss and gradients are those of the whole batch, which
    Lightning's `accumulate_grad_batches` cannot give a contrastive loss: it would only
    contrast each micro-batch with itself. This is open_clip's accum-freq / GradCache, with
    the feature caching done by autograd.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        loss: Mapping[str, Any],
        optim: Mapping[str, Any],
        micro_batches: int = 1,
    ) -> None:
        super().__init__()
        model, loss, optim = plain(model), plain(loss), plain(optim)
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
        self.micro_batches = micro_batches
        self.save_hyperparameters(
            {"model": model, "loss": loss, "optim": optim, "micro_batches": micro_batches}
        )
        self.model: FlipModel = build_model(
            **model,
            init_logit_scale=loss.get("init_logit_scale"),
            init_logit_bias=loss.get("init_logit_bias"),
        )
        # rank and world size are known only once the trainer has set up the processes
        self.criterion = build_loss(loss)

    def setup(self, stage: str) -> None:
        self.criterion = build_loss(
            self.hparams.loss, rank=self.global_rank, world_size=self.trainer.world_size
        )

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> EncoderOutput:
        tokens = self.criterion.requires_tokens
        if self.micro_batches == 1 or not torch.is_grad_enabled():
            return self.model(images, text, return_tokens=tokens)
        if images.shape[0] % self.micro_batches:
            raise ValueError(
                f"a batch of {images.shape[0]} does not split into micro_batches={self.micro_batches} "
                "equal parts; make data.batch_size a multiple of it"
            )
        parts = [
            checkpoint(self.model, image_part, text_part, tokens, use_reentrant=False)
            for image_part, text_part in zip(
                images.chunk(self.micro_batches), text.chunk(self.micro_batches), strict=True
            )
        ]
        # the temperature is one parameter: take it from one part so its gradient counts once
        joined = {"logit_scale": parts[0].logit_scale, "logit_bias": parts[0].logit_bias}
        for field in fields(EncoderOutput):
            values = [getattr(part, field.name) for part in parts]
            if field.name not in joined:
                joined[field.name] = None if values[0] is None else torch.cat(values)
        return EncoderOutput(**joined)

    def _step(self, batch, stage: str) -> torch.Tensor:
        images, text = batch[0], batch[1]
        losses = self.criterion(self(images, text))
        on_step = stage == "train"
        for name, value in losses.items():
            self.log(
                f"{stage}/{name}", value, prog_bar=name == "loss", on_step=on_step, on_epoch=not on_step,
                batch_size=images.shape[0], sync_dist=not on_step,
            )  # fmt: skip
        return losses["loss"]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self.log(
            "train/logit_scale", self.model.logit_scale.exp(), on_step=True, batch_size=batch[0].shape[0]
        )
        return loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def configure_optimizers(self):
        optim = self.hparams.optim
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, optim["weight_decay"]),
            lr=optim["lr"],
            betas=tuple(optim["betas"]),
            eps=optim["eps"],
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = optim["warmup_steps"]
        if isinstance(warmup, float) and warmup < 1:
            warmup = int(warmup * total)
        scheduler = warmup_cosine(optimizer, int(warmup), total, optim.get("min_lr_ratio", 0.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
