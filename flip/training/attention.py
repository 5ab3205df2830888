"""Which scaled-dot-product-attention kernels training may use, chosen per precision.

torch picks an SDPA kernel by shape and dtype, not by speed on the machine at hand, and on the
CPU its choice can be far off: the flash kernel's backward in bfloat16 costs several times the
plain (math) kernel's for short sequences, yet it is the faster one in float32 and for long
sequences (`bench/attention_kernels.py` measures both per shape). So the choice is a
config, keyed by `trainer.precision`, and it holds for the whole fit: backward and any
activation recomputation (micro-batches, gradient checkpointing) run outside `forward` and
must use the kernel the forward used. `AttentionKernels` holds the choice from the start of the
fit to its end, or to the exception that ends it, and the module adds it to the trainer
(`FlipLitModule.configure_callbacks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack

import lightning as L
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {
    name.lower(): backend for name, backend in SDPBackend.__members__.items() if backend != SDPBackend.ERROR
}


def check_attention_kernels(choice: Mapping[str, Sequence[str]] | None) -> dict[str, list[SDPBackend]]:
    """`{precision: [kernel name, ...]}` as SDPBackend lists; unknown names fail, listing the known ones."""
    if choice is None:
        return {}
    if not isinstance(choice, Mapping):
        raise ValueError(
            f"attention_kernels={choice!r}: give a mapping from trainer.precision to a list of kernels, "
            f"e.g. {{bf16-mixed: [math]}}"
        )
    kernels = {}
    for precision, names in choice.items():
        names = [names] if isinstance(names, str) else list(names or [])
        unknown = [n for n in names if str(n).lower() not in KERNELS]
        if unknown or not names:
            raise ValueError(
                f"attention_kernels.{precision}={names!r}: use one or more of {sorted(KERNELS)} "
                "(or leave the precision out for torch's own choice)"
            )
        kernels[str(precision)] = [KERNELS[str(n).lower()] for n in names]
    return kernels


class AttentionKernels(L.Callback):
    """Restricts SDPA to the kernels chosen for the trainer's precision, for the fit only."""

    def __init__(self, kernels: Mapping[str, list[SDPBackend]]) -> None:
        self.kernels = kernels
        self._held = ExitStack()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        chosen = self.kernels.get(str(trainer.precision))  # none chosen: torch's own choice
        if chosen is not None:
            self._held.enter_context(sdpa_kernel(chosen))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._held.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, error: BaseException) -> None:
        self._held.close()
