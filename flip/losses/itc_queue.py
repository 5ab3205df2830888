"""Momentum ITC with feature queues: the image-text contrastive loss of ALBEF, BLIP and FLIP-Base.

Each rank contrasts its B online features with its own B momentum features plus a queue of the
momentum features of earlier global batches, so the negatives outnumber any batch that fits in
memory; the queue holds features of a slowly moving (EMA) copy of the model, which keeps them
consistent with each other. The targets are ALBEF's momentum distillation: the one-hot pairs
mixed, with weight `alpha`, with the momentum model's own softmax over the same columns, so a
caption that fits an image as well as its own is not pushed away as hard.

The term owns the momentum copy and the queues, as registered parameters (frozen) and buffers:
checkpoints save and resume them with the model. It needs the batch itself (`requires_inputs`):
`CombinedLoss` calls `encode_inputs(images, text)` for the momentum features, in the precision the
online forward ran in, then `loss_from_outputs(outputs, encoded)`. The training module calls
`after_optimizer_step(model)` after every optimizer step for the EMA.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flip.losses.clip import check_rank
from flip.models.outputs import EncoderOutput

QUEUE_BUFFERS = ("image_queue", "text_queue")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets_ij log softmax(logits)_ij."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def distilled_targets(momentum_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """ALBEF's soft targets: alpha * softmax(momentum logits) + (1 - alpha) * one-hot, the positive of
    row i being column i (the batch comes before the queue)."""
    one_hot = torch.zeros_like(momentum_logits)
    one_hot.fill_diagonal_(1.0)
    return alpha * momentum_logits.softmax(dim=1) + (1.0 - alpha) * one_hot


class MomentumItcLoss(nn.Module):
    """Contrastive loss against a momentum encoder's batch and queue, with momentum distillation.

    `queue_size` entries per modality (a multiple of the global batch, so every enqueue is one
    contiguous block); `momentum` the EMA factor (p_m <- m p_m + (1 - m) p after each optimizer
    step); `alpha` the weight of the momentum model's softmax in the targets (0: plain one-hot
    InfoNCE against batch + queue), reached linearly over the first `alpha_warmup_steps`
    optimizer steps (ALBEF and BLIP ramp it over the first epoch: a young momentum model's
    softmax says little). The temperature is the model's learnable one, clamped to
    [`min_temperature`, `max_temperature`] as FLIP clamps it ([0.001, 0.5]); the same clamped
    value scores online and momentum similarities.

    The queue starts empty and only its filled part is used, rather than ALBEF's random unit
    vectors: a short run is never contrasted with noise. The momentum copy runs in eval mode (no
    dropout, no patch dropout): its targets are a teacher's, and it draws nothing from the RNG.
    Under DDP, each rank contrasts its own rows with its own momentum batch (as ALBEF does); the
    queue receives every rank's momentum features in rank order, so it is the same on every rank.
    """

    requires_tokens: ClassVar[bool] = False
    requires_inputs: ClassVar[bool] = True
    supports_zero3: ClassVar[bool] = False

    def __init__(
        self,
        queue_size: int = 4096,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_warmup_steps: int = 0,
        min_temperature: float = 0.001,
        max_temperature: float = 0.5,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        check_rank(rank, world_size)
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be a positive integer, got {queue_size!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r} (FLIP and ALBEF use 0.995)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r} (FLIP and ALBEF use 0.4)")
        if not 0.0 < min_temperature <= max_temperature:
            raise ValueError(
                f"need 0 < min_temperature <= max_temperature, got {min_temperature!r}, {max_temperature!r}"
            )
        if (
            isinstance(alpha_warmup_steps, bool)
            or not isinstance(alpha_warmup_steps, int)
            or alpha_warmup_steps < 0
        ):
            raise ValueError(f"alpha_warmup_steps must be an integer >= 0, got {alpha_warmup_steps!r}")
        self.queue_size, self.momentum, self.alpha = queue_size, float(momentum), float(alpha)
        self.alpha_warmup_steps = alpha_warmup_steps
        self.min_temperature, self.max_temperature = float(min_temperature), float(max_temperature)
        self.rank, self.world_size = rank, world_size
        self.momentum_model: nn.Module | None = None
        # [queue_size, D]; D is known from the first features (or from a checkpoint being loaded)
        self.register_buffer("image_queue", torch.zeros(queue_size, 0))
        self.register_buffer("text_queue", torch.zeros(queue_size, 0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # optimizer steps so far

    # ------------------------------------------------------------------ the momentum copy

    def bind(self, model: nn.Module) -> None:
        """Make the momentum copy of `model` (weights and buffers; tokenizer and transforms shared)."""
        shared = {id(v): v for k, v in vars(model).items() if not k.startswith("_")}
        momentum = copy.deepcopy(model, memo=shared)
        for param in momentum.parameters():
            param.requires_grad_(False)
        clip = getattr(momentum, "clip", None)
        if hasattr(clip, "set_grad_checkpointing"):
            clip.set_grad_checkpointing(False)  # nothing to recompute without a graph
        self.momentum_model = momentum.eval()

    def train(self, mode: bool = True) -> MomentumItcLoss:
        super().train(mode)
        if self.momentum_model is not None:
            self.momentum_model.eval()
        return self

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        """p_m <- m p_m + (1 - m) p for every parameter, the same on every rank (DDP keeps p equal)."""
        online = dict(model.named_parameters())
        for name, param in self._bound().named_parameters():
            param.lerp_(online[name].detach().to(param.dtype), 1.0 - self.momentum)
        self.updates += 1

    def current_alpha(self) -> float:
        if not self.alpha_warmup_steps:
            return self.alpha
        return self.alpha * min(1.0, int(self.updates) / self.alpha_warmup_steps)

    def _bound(self) -> nn.Module:
        if self.momentum_model is None:
            raise RuntimeError(
                "MomentumItcLoss has no momentum model: call bind(model) first (FlipLitModule does)"
            )
        return self.momentum_model

    @torch.no_grad()
    def encode_inputs(self, images: torch.Tensor, text: torch.Tensor) -> EncoderOutput:
        return self._bound()(images, text)

    # ------------------------------------------------------------------ the queues

    def _queues_for(self, dim: int, device: torch.device) -> None:
        if self.image_queue.shape[1] == dim:
            return
        if int(self.queue_filled):
            width = self.image_queue.shape[1]
            raise ValueError(f"momentum features of dimension {dim} for queues of dimension {width}")
        for name in QUEUE_BUFFERS:
            setattr(self, name, torch.zeros(self.queue_size, dim, device=device))

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        # the queues take the saved width: a fresh term does not know D before its first batch
        for name in QUEUE_BUFFERS:
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def enqueue(self, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        """Write every rank's momentum features, in rank order, at the pointer."""
        if self.world_size > 1:
            gathered = []
            for features in (image_features, text_features):
                parts = [torch.empty_like(features) for _ in range(self.world_size)]
                dist.all_gather(parts, features.contiguous())
                gathered.append(torch.cat(parts))
            image_features, text_features = gathered
        self._queues_for(image_features.shape[1], image_features.device)
        n, ptr = image_features.shape[0], int(self.queue_ptr)
        if self.queue_size % n or ptr % n:
            raise ValueError(
                f"queue_size={self.queue_size} must be a multiple of the global batch "
                f"({n} = {n // self.world_size} per rank x {self.world_size} ranks) and every batch the same "
                f"size; set loss.terms.<name>.loss.queue_size to a multiple of {n} (e.g. "
                f"{max(1, round(self.queue_size / n)) * n}), or drop incomplete batches"
            )
        self.image_queue[ptr : ptr + n] = image_features.to(self.image_queue.dtype)
        self.text_queue[ptr : ptr + n] = text_features.to(self.text_queue.dtype)
        self.queue_ptr.fill_((ptr + n) % self.queue_size)
        self.queue_filled.fill_(min(int(self.queue_filled) + n, self.queue_size))

    # ------------------------------------------------------------------ the loss

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        momentum_image: torch.Tensor,
        momentum_text: torch.Tensor,
    ) -> torch.Tensor:
        """The loss of this rank's rows; in training mode the momentum features are then enqueued."""
        scale = logit_scale.clamp(1.0 / self.max_temperature, 1.0 / self.min_temperature)
        momentum_image, momentum_text = momentum_image.detach().float(), momentum_text.detach().float()
        self._queues_for(momentum_image.shape[1], momentum_image.device)
        filled = int(self.queue_filled)
        all_image = torch.cat([momentum_image, self.image_queue[:filled].to(momentum_image.dtype)])
        all_text = torch.cat([momentum_text, self.text_queue[:filled].to(momentum_text.dtype)])
        alpha = self.current_alpha()
        with torch.no_grad():
            i2t_targets = distilled_targets(scale.detach() * momentum_image @ all_text.T, alpha)
            t2i_targets = distilled_targets(scale.detach() * momentum_text @ all_image.T, alpha)
        i2t = scale * image_features @ all_text.T
        t2i = scale * text_features @ all_image.T
        loss = (soft_cross_entropy(i2t, i2t_targets) + soft_cross_entropy(t2i, t2i_targets)) / 2
        if self.training:  # validation leaves the queues alone
            self.enqueue(momentum_image, momentum_text)
        return loss

    def loss_from_outputs(self, outputs: EncoderOutput, encoded: EncoderOutput | None = None) -> torch.Tensor:
        if encoded is None:
            raise ValueError(
                "MomentumItcLoss needs the momentum features of the batch: CombinedLoss passes "
                "encode_inputs(images, text) when called with the images and texts"
            )
        return self(
            outputs.image_features,
            outputs.text_features,
            outputs.logit_scale,
            encoded.image_features,
            encoded.text_features,
        )
