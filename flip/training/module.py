"""The Lightning module: towers + contrastive loss + AdamW/cosine.

Hyperparameters are saved as plain dicts so that checkpoints load with `weights_only=True`
and a model can be rebuilt from its checkpoint alone (`flip.load`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from open_clip.transformer import CustomResidualAttentionBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from flip.config import plain
from flip.losses import build_loss
from flip.models import EncoderOutput, FlipModel, build_model
from flip.models.factory import absolute_model_name
from flip.models.flip_model import MAX_LOGIT_SCALE
from flip.models.pretrained import INIT_KEYS, load_tower, lock_towers, weightless
from flip.training.attention import AttentionKernels, check_attention_kernels
from flip.training.nonfinite import NonFiniteGuard
from flip.training.optim import build_optimizer, step_schedule
from flip.training.resume import gather_rng_states, own_rng_state, restore_rng_state, warn_if_optim_changed

log = logging.getLogger(__name__)

RNG_KEY = "flip_rng_state"
ZERO3_SCALARS_KEY = "flip_zero3_scalar_parameters"


def module_options(cfg: DictConfig) -> dict[str, Any]:
    """The module's keyword arguments that live at the top of the training config."""
    return {
        "micro_batches": cfg.get("micro_batches", 1),
        "grad_checkpointing": cfg.get("grad_checkpointing", False),
        "compile": plain(cfg.get("compile", False)),
        "max_nonfinite_steps": cfg.get("max_nonfinite_steps", 5),
        "float32_matmul_precision": cfg.get("float32_matmul_precision", "high"),
        "attention_kernels": plain(cfg.get("attention_kernels")),
    }


def check_checkpointable(model: nn.Module) -> None:
    """`grad_checkpointing` through open_clip: its transformer recomputes each block with the
    arguments of its default block, which its batch-first `block_type: custom` block does not
    take (a TypeError in the first forward); refused at start-up with the setting that works."""
    towers = []
    for name, module in model.named_modules():
        if isinstance(module, CustomResidualAttentionBlock):
            tower = "vision" if ".visual." in name else "text"
            towers += [] if tower in towers else [tower]
    if towers:
        settings = " and ".join(f"model.arch.{tower}_cfg.block_type=default" for tower in towers)
        raise ValueError(
            f"grad_checkpointing=true: open_clip cannot recompute this model's block_type=custom blocks "
            f"({' and '.join(towers)} tower; its checkpoint passes them arguments they do not take): set "
            f"{settings} (the same weights under the same names), or grad_checkpointing=false"
        )


MATMUL_PRECISIONS = ("highest", "high", "medium")


def check_matmul_precision(setting: str | None) -> None:
    if setting is not None and setting not in MATMUL_PRECISIONS:
        raise ValueError(
            f"float32_matmul_precision={setting!r}: use one of {list(MATMUL_PRECISIONS)} or null "
            "(high: TF32 matmuls in 32-bit GPU runs; highest: full float32)"
        )


def use_tf32_where_chosen(trainer: Any, setting: str | None) -> bool:
    """`torch.set_float32_matmul_precision(setting)` for a 32-bit run on CUDA GPUs; True if set.

    torch multiplies float32 matrices in full float32 unless told otherwise, which leaves the
    tensor cores of every GPU since Ampere idle in a run whose user chose trainer.precision=32
    for its range, not for the last bits of its mantissa. "high" lets matmuls use TF32;
    "highest" (or null) keeps torch's default. Mixed-precision runs are left alone: autocast
    already picks the matmul precision.
    """
    from lightning.pytorch.accelerators import CUDAAccelerator

    check_matmul_precision(setting)
    if setting is None or not isinstance(trainer.accelerator, CUDAAccelerator):
        return False
    if not str(trainer.precision).startswith("32"):
        return False
    torch.set_float32_matmul_precision(setting)
    return True


def check_compile_strategy(compile: Any, zero_stage: int | None) -> None:
    """torch.compile under ZeRO-3 is refused before any work.

    Dynamo traces the towers while ZeRO-3 holds each weight as an empty partition, gathered only
    inside its module's forward hooks, and the traced attention fails on them ("b must be 2D").
    """
    if compile and zero_stage == 3:
        raise ValueError(
            f"compile={compile!r} does not work with DeepSpeed ZeRO-3 (trainer.strategy.config."
            "zero_optimization.stage=3, as in trainer=deepspeed_zero3 and deepspeed_zero3_offload): "
            "torch.compile traces the towers over ZeRO-3's partitioned weights. Set compile=false "
            "with ZeRO-3, or compile under trainer=deepspeed_zero2, ddp, multinode or gpu"
        )


def check_loss_strategy(loss: Mapping[str, Any], zero_stage: int | None) -> None:
    """A loss term that keeps a momentum copy of the model is refused under ZeRO-3, before any work.

    ZeRO-3 partitions every parameter of the engine's module, the copy's too, and gathers them only
    inside their module's forward hooks; the EMA update reads and writes whole weights outside them.
    """
    if zero_stage != 3:
        return
    for name, term in (loss.get("terms") or {}).items():
        target = (term.get("loss") or {}).get("_target_") if isinstance(term, Mapping) else None
        if target and not getattr(get_class(target), "supports_zero3", True):
            raise ValueError(
                f"loss.terms.{name} ({target}) keeps a momentum copy of the model, which DeepSpeed ZeRO-3 "
                "(trainer.strategy.config.zero_optimization.stage=3, as in trainer=deepspeed_zero3 and "
                "deepspeed_zero3_offload) would partition; train it under trainer=deepspeed_zero2, ddp, "
                "multinode or gpu"
            )


def check_foils_used(loss: Mapping[str, Any], hard_negatives: Any) -> None:
    """`data.hard_negatives` encodes foil captions every step; a loss with no term that reads them
    (loss=itc_queue alone) would pay for them and learn nothing from them, so it is refused. A
    `foil_choice_weight` without foils would silently train without the term it asks for, and
    statements (`form: statement`) without a term that scores them would teach nothing."""
    term_losses = {
        name: term.get("loss") or {}
        for name, term in (loss.get("terms") or {}).items()
        if isinstance(term, Mapping)
    }
    if not hard_negatives:
        weighted = [name for name, term_loss in term_losses.items() if term_loss.get("foil_choice_weight")]
        if weighted:
            raise ValueError(
                f"loss.terms.{weighted[0]}.loss.foil_choice_weight is set, but data.hard_negatives is "
                f"{hard_negatives!r}: the term chooses among foils, so give it some (e.g. "
                "data.hard_negatives=auto) or set foil_choice_weight=0"
            )
        return
    terms = {name: term_loss.get("_target_") for name, term_loss in term_losses.items()}
    if not any(target and getattr(get_class(target), "uses_foils", False) for target in terms.values()):
        raise ValueError(
            f"data.hard_negatives={hard_negatives!r}, but no term of this loss ({terms}) uses foil captions; "
            "the clip, siglip and filip terms do (e.g. loss=clip_filip), or set data.hard_negatives=null"
        )
    if isinstance(hard_negatives, Mapping) and hard_negatives.get("form") == "statement":
        scoring = [
            name
            for name, term_loss in term_losses.items()
            if term_loss.get("foil_choice_weight")
            or (terms[name] and getattr(get_class(terms[name]), "scores_statements", False))
        ]
        if not scoring:
            raise ValueError(
                f"data.hard_negatives.form=statement, but no term of this loss ({terms}) scores statements: "
                "they lead with a positive and are scored by the choice term alone, so set "
                "foil_choice_weight above 0 on a clip or filip term (e.g. loss.terms.clip.loss."
                "foil_choice_weight=2.0), or use a siglip term"
            )


def zero_stage(trainer_cfg: Mapping[str, Any]) -> int | None:
    """The ZeRO stage a trainer config asks DeepSpeed for; None when it is not DeepSpeed."""
    strategy = trainer_cfg.get("strategy")
    # Lightning's registered names: deepspeed_stage_3, deepspeed_stage_3_offload, ...
    if isinstance(strategy, str):
        return 3 if strategy.startswith("deepspeed_stage_3") else None
    if not isinstance(strategy, Mapping) or "DeepSpeed" not in str(strategy.get("_target_", "")):
        return None
    stage = (strategy.get("config") or {}).get("zero_optimization", {}).get("stage")
    return strategy.get("stage", 2) if stage is None else stage


def clipping_refuses_fused(trainer: Any) -> bool:
    """Lightning's mixed-precision plugin refuses to clip the gradients of a fused optimizer.

    It assumes that an optimizer which unscales its own gradients (torch's fused AdamW declares
    so) is unscaled after clipping, which would clip loss-scaled values; it refuses even in
    bf16, where nothing is scaled. DeepSpeed clips inside its engine and is not affected.
    """
    from lightning.pytorch.plugins.precision import MixedPrecision

    return bool(trainer.gradient_clip_val) and isinstance(trainer.precision_plugin, MixedPrecision)


def _is_deepspeed(strategy: Any) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


class FlipLitModule(L.LightningModule):
    """`micro_batches` > 1 trains on batches larger than memory allows, keeping every negative.

    Each batch is encoded in that many micro-batches whose activations are not kept but
    recomputed during backward (non-reentrant checkpointing); the loss sees the features of
    the whole batch at once. Loss and gradients are those of the whole batch, which
    Lightning's `accumulate_grad_batches` cannot give a contrastive loss: it would only
    contrast each micro-batch with itself. This is open_clip's accum-freq / GradCache, with
    the feature caching done by autograd.

    `grad_checkpointing` recomputes each tower's transformer blocks in backward (open_clip's
    switch, both towers); `compile` runs the towers through `torch.compile` (True, or a dict
    of its arguments); `float32_matmul_precision` is torch's, set for 32-bit runs on CUDA
    (see `use_tf32_where_chosen`); `attention_kernels` restricts the attention kernels of the
    fit per precision (see `flip.training.attention`); a non-finite loss skips its step on every rank, and
    `max_nonfinite_steps` of them in a row stop the run.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        loss: Mapping[str, Any],
        optim: Mapping[str, Any],
        micro_batches: int = 1,
        grad_checkpointing: bool = False,
        compile: bool | Mapping[str, Any] = False,
        max_nonfinite_steps: int = 5,
        float32_matmul_precision: str | None = "high",
        attention_kernels: Mapping[str, list[str]] | None = None,
    ) -> None:
        super().__init__()
        model, loss, optim = plain(model), plain(loss), plain(optim)
        if isinstance(model.get("name"), str):
            model = {**model, "name": absolute_model_name(model["name"])}
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
        self.micro_batches = micro_batches
        self.compile_options = compile
        check_matmul_precision(float32_matmul_precision)
        self.float32_matmul_precision = float32_matmul_precision
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.attention_kernels = check_attention_kernels(attention_kernels)
        # the checkpoint keeps the weight-free recipe (flip.load never fetches weights) and,
        # apart, where the initial weights came from
        self.save_hyperparameters(
            {
                "model": weightless(model),
                "model_init": model,
                "loss": loss,
                "optim": optim,
                "micro_batches": micro_batches,
                "grad_checkpointing": grad_checkpointing,
            }
        )
        self.model: FlipModel = build_model(**{k: v for k, v in model.items() if k not in INIT_KEYS.values()})
        for tower, key in INIT_KEYS.items():
            if model.get(key):
                load_tower(self.model, tower, model[key])
        lock_towers(self.model, optim)
        if grad_checkpointing:
            check_checkpointable(self.model)
            self.model.clip.set_grad_checkpointing(True)
        # rank and world size are known only once the trainer has set up the processes
        self.criterion = build_loss(loss)
        self.criterion.bind(self.model)  # a momentum copy (loss=itc_queue) exists before a checkpoint loads
        self._rng_to_restore: dict[str, Any] | None = None
        self._zero3_scalars: list[str] = []
        self._skip_update = False  # set by a non-finite step, for its optimizer step

    def setup(self, stage: str) -> None:
        self.criterion = build_loss(
            self.hparams.loss, rank=self.global_rank, world_size=self.trainer.world_size
        )
        strategy = self.trainer.strategy
        check_loss_strategy(self.hparams.loss, 3 if getattr(strategy, "zero_stage_3", False) else None)
        self.criterion.bind(self.model)
        use_tf32_where_chosen(self.trainer, self.float32_matmul_precision)
        if _is_deepspeed(strategy) and strategy.zero_stage_3 and not self._zero3_scalars:
            self._zero3_scalars = self.model.prepare_for_zero3(owner=self)
        check_compile_strategy(self.compile_options, 3 if getattr(strategy, "zero_stage_3", False) else None)
        if self.compile_options and not getattr(self, "_compiled", False):
            options = self.compile_options if isinstance(self.compile_options, Mapping) else {}
            self.model.compile(**options)  # in place: parameter names (and checkpoints) stay the same
            self._compiled = True

    def configure_callbacks(self) -> list[L.Callback]:
        return [AttentionKernels(self.attention_kernels)] if self.attention_kernels else []

    def forward(
        self,
        images: torch.Tensor,
        text: torch.Tensor,
        foils: torch.Tensor | None = None,
        foil_mask: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """The batch's features, with its foil captions [B, F, L] and their mask [B, F] when given
        (`data.hard_negatives`), in `micro_batches` parts whose activations backward recomputes."""
        tokens = self.criterion.requires_tokens
        foil_tokens = tokens
        if foils is not None:
            foils = self.model.trim_foils(foils)
            reads = getattr(self.criterion, "reads_foil_tokens", None)
            foil_tokens = tokens and (reads is None or reads(foil_mask))
        if self.micro_batches == 1 or not torch.is_grad_enabled():
            return self.model(images, text, tokens, foils, foil_mask, foil_tokens)
        if images.shape[0] % self.micro_batches:
            raise ValueError(
                f"a batch of {images.shape[0]} does not split into micro_batches={self.micro_batches} "
                "equal parts; make data.batch_size a multiple of it"
            )
        chunks = [t.chunk(self.micro_batches) for t in (images, text)]
        chunks += [
            [None] * self.micro_batches if t is None else t.chunk(self.micro_batches)
            for t in (foils, foil_mask)
        ]
        parts = [
            checkpoint(
                self.model,
                image_part,
                text_part,
                tokens,
                foil_part,
                mask_part,
                foil_tokens,
                use_reentrant=False,
            )
            for image_part, text_part, foil_part, mask_part in zip(*chunks, strict=True)
        ]
        # the temperature is one parameter: take it from one part so its gradient counts once
        joined = {"logit_scale": parts[0].logit_scale, "logit_bias": parts[0].logit_bias}
        for field in fields(EncoderOutput):
            values = [getattr(part, field.name) for part in parts]
            if field.name not in joined:
                joined[field.name] = None if values[0] is None else torch.cat(values)
        return EncoderOutput(**joined)

    def _log_losses(self, losses: Mapping[str, torch.Tensor], stage: str, batch_size: int) -> None:
        on_step = stage == "train"
        for name, value in losses.items():
            self.log(
                f"{stage}/{name}", value, prog_bar=name == "loss", on_step=on_step, on_epoch=not on_step,
                batch_size=batch_size, sync_dist=not on_step,
            )  # fmt: skip

    def _losses(self, features: EncoderOutput, images: torch.Tensor, text: torch.Tensor) -> dict:
        if getattr(self.criterion, "requires_inputs", False):  # a momentum encoder encodes the batch too
            return self.criterion(features, images, text)
        return self.criterion(features)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, text = batch[0], batch[1]
        # terms weighted by the step (the foil choice schedule); before the forward, which encodes
        # only the foil fields a term reads at this step
        if hasattr(self.criterion, "at_step"):
            self.criterion.at_step(self.global_step)
        features = self(images, text, *batch[2:4])  # foil token ids and mask (data.hard_negatives)
        if len(batch) > 2:
            has_foil = batch[3].any(dim=1).float().mean()
            self.log("train/foil_fraction", has_foil, on_step=True, batch_size=len(images))
        losses = self._losses(features, images, text)
        strategy = self.trainer.strategy if self.trainer.world_size > 1 else None
        finite = self.nonfinite.check(losses, self.global_step, strategy)  # the same answer on every rank
        # every step logs its own values: Lightning would otherwise log a skipped step with the
        # last finite loss again (it keeps the last value of each on-step metric)
        self._log_losses(losses, "train", images.shape[0])
        self.log("train/logit_scale", features.logit_scale.detach(), on_step=True, batch_size=len(images))
        if self.nonfinite.skipped:  # from the first skip on, every step logs the count so far
            self.log(
                "train/skipped_steps", float(self.nonfinite.skipped), on_step=True, batch_size=len(images)
            )
        if finite:
            return losses["loss"]
        self._skip_update = True
        return self._zero_loss(features)

    def _zero_loss(self, features: EncoderOutput) -> torch.Tensor:
        """A loss of 0 whose gradient is exactly 0, for a step whose update is skipped.

        Every rank takes it together (the guard's decision is all-reduced), so the collectives
        of backward still line up: DDP expects a gradient for every trainable parameter, and
        gets it from `p.sum() * 0`, which stays 0 whatever NaN the batch produced. Returning
        None instead, as Lightning offers, is refused by Lightning on more than one process and
        by DeepSpeed always. Under DeepSpeed the parameters outside a forward are ZeRO-3
        partitions, so the zero comes from the temperature the forward used; DeepSpeed fills in
        the gradients no parameter received.
        """
        if _is_deepspeed(self.trainer.strategy):
            return features.logit_scale.sum() * 0.0
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, text = batch[0], batch[1]
        losses = self._losses(self(images, text), images, text)
        self._log_losses(losses, "val", images.shape[0])
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        # the gradient norm before clipping: the first thing to look at when a large run diverges
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                self.log("optim/grad_norm", norm, on_step=True, batch_size=1)
        if self._skip_update:
            self._skip_update = False
            self._skip_optimizer_step(optimizer)

    def _skip_optimizer_step(self, optimizer) -> None:
        """The optimizer step after a non-finite loss changes nothing (with gradient accumulation,
        the whole accumulated step is skipped).

        The torch optimizers pass over parameters without a gradient: no update, no change to
        their moments. DeepSpeed steps its own copies whatever the gradients say, so there the
        step runs with zero gradients at a zero learning rate: the weights stay, and the
        scheduler sets the rate again after the step.
        """
        if _is_deepspeed(self.trainer.strategy):
            for group in optimizer.param_groups:
                group["lr"] = 0.0
            return
        for param in self.parameters():
            param.grad = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if hasattr(self.criterion, "after_optimizer_step"):  # loss=itc_queue: the momentum copy's EMA
            self.criterion.after_optimizer_step(self.model)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if _is_deepspeed(self.trainer.strategy):
            return  # DeepSpeed's master weights would undo it; FlipModel.forward applies the cap
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = gather_rng_states(self.trainer.world_size)  # every rank's, by rank
        if self._zero3_scalars:
            checkpoint[ZERO3_SCALARS_KEY] = list(self._zero3_scalars)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # applied when training starts: restoring happens before the loaders are built, and
        # building them draws from the global generator
        self._rng_to_restore = checkpoint.get(RNG_KEY)
        if self.global_rank == 0:
            warn_if_optim_changed(checkpoint.get("hyper_parameters", {}).get("optim"), self.hparams.optim)

    def on_train_start(self) -> None:
        own = own_rng_state(self._rng_to_restore, self.global_rank, self.trainer.world_size)
        if own is not None:
            restore_rng_state(own)
        self._rng_to_restore = None

    def configure_optimizers(self):
        optim = self.hparams.optim
        if optim.get("fused") and clipping_refuses_fused(self.trainer):
            log.info(
                "optim.fused: using the unfused AdamW, as Lightning clips gradients under mixed "
                "precision (trainer.gradient_clip_val with %s) only with an optimizer that does not "
                "unscale them itself",
                self.trainer.precision,
            )
            optim = {**optim, "fused": False}
        optimizer = build_optimizer(self.model, optim, self.trainer.strategy)
        return step_schedule(optimizer, optim, int(self.trainer.estimated_stepping_batches))
