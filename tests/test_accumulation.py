"""Micro-batched encoding must be the whole batch's loss and gradients, not an approximation."""

import pytest
import torch

from flip.training.module import FlipLitModule

from .helpers import MODEL, OPTIM, TINY_ARCH, loss_file


def _loss_and_grads(loss_name: str, micro_batches: int, images, text):
    torch.manual_seed(0)  # identical initial weights for every variant
    loss_cfg, model_settings = loss_file(loss_name)
    module = FlipLitModule({**MODEL, **model_settings}, loss_cfg, OPTIM, micro_batches=micro_batches)
    losses = module.criterion(module(images, text))
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["clip", "siglip", "filip", "clip_filip"])
def test_k_micro_batches_equal_one_batch_of_k_times_b(loss_name):
    torch.manual_seed(1234)
    images = torch.randn(12, 3, 32, 32)
    words = ["hat", "glasses", "beard", "smiling face", "red hair", "bald head"]
    prompts = [f"a person with {words[i % 6]}" + " and bangs" * (i % 3) for i in range(12)]
    from flip.models import build_model

    text = build_model("flip-test-tiny", TINY_ARCH).tokenize(prompts)
    whole_losses, whole_grads = _loss_and_grads(loss_name, 1, images, text)
    for k in (3, 4):
        losses, grads = _loss_and_grads(loss_name, k, images, text)
        for name in whole_losses:
            torch.testing.assert_close(losses[name], whole_losses[name], atol=1e-5, rtol=0)
        assert grads.keys() == whole_grads.keys()
        assert any(g.abs().sum() > 0 for g in grads.values())
        for name, grad in whole_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=1e-4, msg=f"{name} with k={k}")


def test_a_batch_that_does_not_split_is_rejected_with_the_fix():
    loss_cfg = loss_file("clip")[0]
    module = FlipLitModule(MODEL, loss_cfg, OPTIM, micro_batches=4)
    with pytest.raises(ValueError, match="multiple of it"):
        module(torch.randn(6, 3, 32, 32), torch.zeros(6, 24, dtype=torch.long))
    with pytest.raises(ValueError, match="micro_batches must be an integer >= 1, got 0"):
        FlipLitModule(MODEL, loss_cfg, OPTIM, micro_batches=0)
