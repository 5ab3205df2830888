"""EMA of the fine-tuned weights, through Lightning's weight-averaging callback.

After each optimizer step from `start_step` on (every `every_n_steps`), the average becomes
`decay * average + (1 - decay) * weights` (torch's `get_ema_multi_avg_fn`; the first update
copies the weights). Lightning validates with the averaged weights and checkpoints both: the
average under `state_dict`, the raw weights under `current_model_state`, which a resumed run
restores. At the end of training Lightning would copy the average over the raw weights; here
the module keeps its raw weights and the average stays apart (`averaged`), so a run evaluates
and exports both, side by side.

Only parameters are averaged (`use_buffers=False`): the text tower's attention mask is a
buffer of -inf entries, and averaging -inf with itself gives NaN.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(WeightAveraging):
    def __init__(self, decay: float = 0.999, every_n_steps: int = 1, start_step: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(
                f"ema.decay={decay} must be in [0, 1) (e.g. 0.999), or ema.decay=null for no EMA"
            )
        if every_n_steps < 1 or start_step < 0:
            raise ValueError(
                f"ema.every_n_steps={every_n_steps} must be >= 1 and ema.start_step={start_step} >= 0"
            )
        super().__init__(use_buffers=False, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay, self.every_n_steps, self.start_step = decay, every_n_steps, start_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None:  # the per-epoch call: steps only
            return False
        return step_idx >= self.start_step and (step_idx - self.start_step) % self.every_n_steps == 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the raw weights in the module (Lightning's callback copies the average over them)."""

    def averaged(self) -> L.LightningModule:
        """A copy of the module holding the averaged weights."""
        if self._average_model is None:
            raise RuntimeError("the EMA exists once training has started (Trainer.fit)")
        return self._average_model.module
