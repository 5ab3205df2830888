"""Non-finite losses: skip the step, say so, and stop the run when it keeps happening.

One NaN batch (a bad sample, an fp16 overflow) must not poison the weights of a multi-day run;
but a run whose loss stays non-finite is diverging, and burning GPU hours on skipped steps
helps nobody. The decision is made on every rank together, so all ranks skip the same step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after `max_consecutive` non-finite losses in a row."""


class NonFiniteGuard:
    def __init__(self, max_consecutive: int = 5) -> None:
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be an integer >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.in_a_row = 0
        self.skipped = 0

    def check(self, losses: Mapping[str, torch.Tensor], step: int, strategy=None) -> bool:
        """True when the loss is finite on every rank; counts, logs and maybe raises otherwise."""
        finite = bool(torch.isfinite(losses["loss"].detach()).all())
        if strategy is not None:
            finite = strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        values = {name: _value(v) for name, v in losses.items()}
        log.warning(
            "non-finite loss at step %d %s: step skipped (%d in a row, %d in this run)",
            step, values, self.in_a_row, self.skipped,
        )  # fmt: skip
        if self.in_a_row >= self.max_consecutive:
            raise NonFiniteLossError(
                f"the loss was non-finite for {self.in_a_row} steps in a row (last at step {step}: "
                f"{values}); training stopped. Lower optim.lr or raise optim.warmup_steps, set "
                "trainer.gradient_clip_val, prefer trainer.precision=bf16-mixed to 16-mixed, and check "
                "the data for corrupt samples; resume from the last checkpoint with ckpt_path=... "
                "(max_nonfinite_steps sets the limit)"
            )
        return False


def _value(tensor: torch.Tensor) -> float:
    value = float(tensor.detach().float().mean())
    return value if not math.isfinite(value) else round(value, 4)
