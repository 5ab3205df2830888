"""The fine-tuning Lightning module: a FLIP model's image tower, adapted, and a task's head.

Hyperparameters are saved as plain dicts (checkpoints load with `weights_only=True`): the
weight-free model recipe, the bound task (its head and what the training split fixed), the
adaptation and the optimizer. Checkpoints also carry every rank's random generators, as
pretraining's do (flip.training.resume), so an interrupted fine-tune resumes exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from flip.config import plain
from flip.evaluation.tasks import Task
from flip.models import FlipModel
from flip.models.heads import image_features
from flip.models.pretrained import weightless
from flip.training.finetune.adapt import Adaptation
from flip.training.finetune.layer_decay import layer_decay_groups, vit_blocks
from flip.training.optim import optimizer_class, step_schedule
from flip.training.resume import gather_rng_states, own_rng_state, restore_rng_state, warn_if_optim_changed

log = logging.getLogger(__name__)

RNG_KEY = "flip_rng_state"
RAW_WEIGHTS_KEY = "current_model_state"  # where Lightning's weight averaging keeps the raw weights


def build_task(cfg: Mapping[str, Any]) -> Task:
    """A task from its config node (conf/task/<name>.yaml, plus what `Task.bind` fixed)."""
    task = instantiate(dict(cfg), _convert_="all")
    if not isinstance(task, Task):
        raise ValueError(f"task._target_={cfg.get('_target_')!r} is not a flip.evaluation.tasks.Task")
    return task


class FinetuneLitModule(L.LightningModule):
    """`model` (a FlipModel, weights included) adapted as `adapt` says, with `task`'s head on top.

    `task` is the task's config with its bound settings (`Task.bind` of the training split);
    `optim` holds lr, weight_decay, betas, eps, warmup_steps, min_lr_ratio and layer_decay.
    """

    def __init__(
        self,
        model: FlipModel,
        task: Mapping[str, Any],
        adapt: Mapping[str, Any],
        optim: Mapping[str, Any],
    ) -> None:
        super().__init__()
        task, adapt, optim = plain(task), plain(adapt), plain(optim)
        self.adaptation = Adaptation.from_config(adapt)
        self.task = build_task(task)
        self.save_hyperparameters(
            {"model": weightless(model.config), "task": task, "adapt": adapt, "optim": optim}
        )
        self.head = self.task.head_for(model)
        self.model = self.adaptation.apply(model)
        self._rng_to_restore: Any = None
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Lightning keeps each module's mode as given, and flip.load gives an eval-mode model
        self.train()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(image_features(self.model.clip.visual, images, self.head.blocks))

    def train(self, mode: bool = True) -> FinetuneLitModule:
        super().train(mode)
        if self.adaptation.method == "frozen":  # a frozen tower computes what it will be evaluated with
            self.model.eval()
        return self

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss = self.task.loss(self(images).float(), targets)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        if batch is None:  # no readable image in this batch
            return
        images, targets = batch
        outputs = self(images).float()
        self.log(
            "val/loss",
            self.task.loss(outputs, targets),
            on_epoch=True,
            sync_dist=True,
            batch_size=len(images),
        )
        self._val_outputs.append((self.task.kept(outputs.detach()), targets))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        outputs = torch.cat([o for o, _ in self._val_outputs])
        targets = torch.cat([t for _, t in self._val_outputs])
        self._val_outputs.clear()
        if self.trainer.world_size > 1:  # every rank's share of the split, then one score
            outputs = self.all_gather(outputs).flatten(0, 1)
            targets = self.all_gather(targets).flatten(0, 1)
        value = self.task.scores(outputs, targets)["summary"][self.task.headline]
        # the same value on every rank (computed from all ranks' outputs): averaging it changes nothing
        self.log(f"val/{self.task.headline}", float(value), batch_size=len(outputs), sync_dist=True)

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = gather_rng_states(self.trainer.world_size)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get(RNG_KEY)
        if RAW_WEIGHTS_KEY in checkpoint and not self._averaging():
            # written with ema: `state_dict` holds the average, the raw weights are kept apart
            log.info("the checkpoint was written with ema; resuming without it, from its raw weights")
            checkpoint["state_dict"] = checkpoint[RAW_WEIGHTS_KEY]
        if self.global_rank == 0:
            warn_if_optim_changed(checkpoint.get("hyper_parameters", {}).get("optim"), self.hparams.optim)

    def _averaging(self) -> bool:
        from lightning.pytorch.callbacks import WeightAveraging

        return any(isinstance(c, WeightAveraging) for c in self.trainer.callbacks)

    def on_train_start(self) -> None:
        own = own_rng_state(self._rng_to_restore, self.global_rank, self.trainer.world_size)
        if own is not None:
            restore_rng_state(own)
        self._rng_to_restore = None

    def parameter_groups(self) -> list[dict]:
        """The trainable parameters by depth, each group at its layer-decayed rate (layer_decay.py)."""
        optim = self.hparams.optim
        decay = float(optim.get("layer_decay", 1.0))
        try:
            blocks = vit_blocks(self.model.clip.visual)
        except ValueError:
            if decay != 1.0:
                raise
            blocks = 0  # any tower: one rate for all
        return layer_decay_groups(self.named_parameters(), blocks, optim["lr"], decay, optim["weight_decay"])

    def configure_optimizers(self):
        optim = self.hparams.optim
        groups = self.parameter_groups()
        cls = optimizer_class(self.trainer.strategy)
        kwargs = {"lr": optim["lr"], "betas": tuple(optim["betas"]), "eps": optim["eps"]}
        if cls is not torch.optim.AdamW:
            kwargs["adamw_mode"] = True
        optimizer = cls(groups, **kwargs)
        return step_schedule(optimizer, optim, int(self.trainer.estimated_stepping_batches))
