"""`attention_kernels`: the SDPA kernels a fit may use, per precision, for the whole fit only."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from flip.training.attention import check_attention_kernels
from flip.training.module import FlipLitModule

from .helpers import MODEL, OPTIM, fit_briefly, loss_file


class FlashFlags(L.Callback):
    """Whether the flash kernel was allowed during each forward and each backward of the fit."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.append(torch.backends.cuda.flash_sdp_enabled())

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # after backward
        self.seen.append(torch.backends.cuda.flash_sdp_enabled())


@pytest.mark.parametrize(("precision", "restricted"), [("bf16-mixed", True), ("32-true", False)])
def test_the_kernels_chosen_for_the_precision_hold_through_the_fit_and_are_released_after(
    precision, restricted
):
    module = FlipLitModule(MODEL, loss_file("clip")[0], OPTIM, attention_kernels={"bf16-mixed": ["math"]})
    flags = FlashFlags()
    fit_briefly(module, callbacks=[flags], steps=2, precision=precision)
    assert flags.seen == [not restricted] * 4  # two forwards, two backwards
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_a_failed_fit_releases_the_kernels_too():
    class Boom(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            raise RuntimeError("boom")

    module = FlipLitModule(MODEL, loss_file("clip")[0], OPTIM, attention_kernels={"32-true": ["math"]})
    with pytest.raises(RuntimeError, match="boom"):
        fit_briefly(module, callbacks=[Boom()], steps=1)
    assert torch.backends.cuda.flash_sdp_enabled()


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ({"bf16-mixed": ["maths"]}, r"attention_kernels.bf16-mixed=\['maths'\]: use one or more of \["),
        ({"bf16-mixed": []}, r"attention_kernels.bf16-mixed=\[\]"),
        (["math"], r"attention_kernels=\['math'\]: give a mapping from trainer.precision"),
    ],
)
def test_unknown_kernels_fail_naming_the_known_ones(choice, message):
    with pytest.raises(ValueError, match=message) as error:
        FlipLitModule(MODEL, loss_file("clip")[0], OPTIM, attention_kernels=choice)
    if "use one or more" in message:
        assert "'math'" in str(error.value) and "'flash_attention'" in str(error.value)


def test_kernel_names_are_case_insensitive_and_a_single_name_is_a_list():
    kernels = check_attention_kernels({"bf16-mixed": "MATH", "32-true": ["flash_attention", "math"]})
    assert kernels == {
        "bf16-mixed": [torch.nn.attention.SDPBackend.MATH],
        "32-true": [torch.nn.attention.SDPBackend.FLASH_ATTENTION, torch.nn.attention.SDPBackend.MATH],
    }
