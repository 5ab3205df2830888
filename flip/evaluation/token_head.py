"""The token probe's head and its training loop, on normalised cached vectors.

Both released heads (FLIP's: one LayerNorm shared by all vectors, raw learned weights;
facer's: a LayerNorm per vector, softmax-normalised weights, dropout) start by normalising each
vector over its width, a step with no parameters: it is done once, in place, on the cached
vectors (`normalize_vectors_`), and the result may be kept in bfloat16: the loop reads every
vector each epoch, so its cost is mostly the bytes read, while the head computes in float32.
What is left is linear in the vectors, so a batch costs a gather, one pass for the weighted sum
and one for its gradients (written out in `batch_gradients`; autograd only from the loss to the
logits). Batches are index slices of one tensor, not a DataLoader; AdamW with FLIP's per-epoch
cosine schedule to 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from flip.evaluation.probe_targets import ProbeTargets

log = logging.getLogger(__name__)

HEADS = ("flip", "facer")
COMPILE_FROM_STEPS = 20_000
LAYER_NORM_EPS = 1e-5  # open_clip's and FLIP's LayerNorm


VECTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHUNK_BYTES = 4 << 20  # rows normalised at a time: a chunk and its output stay in cache


def resolve_vector_dtype(name: str) -> torch.dtype:
    """The dtype the normalised vectors are kept in, by its config name."""
    if name not in VECTOR_DTYPES:
        raise ValueError(f"vector_dtype={name!r}: expected one of {tuple(VECTOR_DTYPES)}")
    return VECTOR_DTYPES[name]


def normalize_vectors_(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm without its affine part of every vector [..., width], in x's own memory; the
    result in `dtype` (x's when None).

    x is consumed: no second copy of the cached vectors is made. A narrower dtype (bfloat16 for
    float32 vectors) is written over the front of x's storage, row chunk by row chunk (a chunk is
    normalised before its narrower output is written, and that output ends before any row not yet
    read), so every epoch reads half the bytes; x itself is then left holding meaningless values.
    """
    dtype = x.dtype if dtype is None else dtype
    x = x.contiguous()
    if dtype.itemsize > x.element_size():
        x = x.to(dtype)
    out = x if dtype == x.dtype else x.view(-1).view(dtype)[: x.numel()].view(x.shape)
    row_bytes = max(1, math.prod(x.shape[1:]) * x.element_size())
    start = 0
    compute = torch.promote_types(x.dtype, torch.float32)  # never below float32
    for block in x.split(max(1, CHUNK_BYTES // row_bytes)):
        normed = F.layer_norm(block.to(compute), block.shape[-1:], eps=LAYER_NORM_EPS)
        out[start : start + len(block)].copy_(normed)
        start += len(block)
    return out


class TokenHead(nn.Module):
    """The head on normalised vectors [B, V, D]: LayerNorm affine, weighted sum over V, Linear.

    Both heads are h = sum_v scale_v * z_v + shift with scale_v = a_v gamma(_v) and shift =
    sum_v a_v beta(_v) (a: the raw weights for flip, their softmax for facer), so one pass over
    the vectors gives h and one more the gradients of every head parameter (`batch_gradients`):
    the training loop needs no autograd graph over the [B, V, D] batch.
    """

    def __init__(self, vectors: int, width: int, outputs: int, kind: str = "flip", dropout: float = 0.0):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"token-probe head {kind!r}: expected one of {HEADS}")
        self.kind, self.dropout = kind, float(dropout)
        shape = (width,) if kind == "flip" else (vectors, width)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.linear = nn.Linear(width, outputs)
        if kind == "flip":  # FLIP: xavier_uniform_ on weights [1, V, 1] and on the Linear's weight
            bound = math.sqrt(6.0 / (vectors + 1))
            self.weight = nn.Parameter(torch.empty(vectors).uniform_(-bound, bound))
            nn.init.xavier_uniform_(self.linear.weight)
        else:  # facer: ones before the softmax, i.e. equal weights
            self.weight = nn.Parameter(torch.zeros(vectors))

    def mixing(self) -> torch.Tensor:
        """The weights over the vectors as the head applies them."""
        return self.weight if self.kind == "flip" else self.weight.softmax(dim=0)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """scale [V, D] and shift [D] of h = sum_v scale_v * z_v + shift."""
        a = self.mixing()
        if self.kind == "flip":
            return a[:, None] * self.gamma, a.sum() * self.beta
        return a[:, None] * self.gamma, (a[:, None] * self.beta).sum(dim=0)

    @staticmethod
    def combine(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """sum_v scale_v * z_v + shift, one fused multiply-add per vector (no [B, V, D] temporary)."""
        h = z[:, 0] * scale[0]
        for v in range(1, z.shape[1]):
            h = h.addcmul(z[:, v], scale[v]) if torch.is_grad_enabled() else h.addcmul_(z[:, v], scale[v])
        return h + shift

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.combine(z, *self.scale_shift())
        keep = self.dropout_keep(len(z), z.device)
        return self.linear(h if keep is None else h * keep)

    def dropout_keep(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """The dropout multiplier of a training batch (None without dropout or in eval mode)."""
        if not (self.dropout and self.training):
            return None
        keep = torch.rand(rows, self.gamma.shape[-1], device=device) >= self.dropout
        return keep.to(self.gamma.dtype) / (1.0 - self.dropout)


def batch_gradients(
    head: TokenHead,
    z: torch.Tensor,
    rows: torch.Tensor,
    targets: ProbeTargets,
    keep: torch.Tensor | None,
    with_loss: bool = True,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The loss of a training batch (vectors z of the training `rows`; None unless `with_loss`:
    training needs only the gradients) and the gradient of every head parameter, by name.

    Written out rather than left to autograd: the head is h = sum_v scale_v * z_v + shift, so
    one pass over the batch's vectors gives h and one more d loss / d scale, from which every
    parameter's gradient follows in a few [V, D]-sized products. Plain tensor code, so
    torch.compile can fuse each pass into one kernel (`compile` in ProbeSettings). The batch is
    gathered before: both passes then read it from cache, not the cached vectors twice.
    """
    a = head.mixing()
    scale, shift = head.scale_shift()
    h = head.combine(z, scale, shift)
    used = h if keep is None else h * keep
    weight, bias = head.linear.weight, head.linear.bias
    value, grad_logits = targets.loss_gradient(torch.addmm(bias, used, weight.T), rows, with_loss)
    grads = {"linear.weight": grad_logits.T @ used, "linear.bias": grad_logits.sum(dim=0)}
    grad_h = grad_logits @ weight
    if keep is not None:
        grad_h = grad_h * keep
    grad_scale = (z * grad_h[:, None, :]).sum(dim=0)  # [V, D]
    grad_shift = grad_h.sum(dim=0)  # [D]
    if head.kind == "flip":
        grads["gamma"] = a @ grad_scale
        grads["beta"] = a.sum() * grad_shift
        grads["weight"] = grad_scale @ head.gamma + head.beta @ grad_shift
    else:
        grads["gamma"] = a[:, None] * grad_scale
        grads["beta"] = a[:, None] * grad_shift
        grad_a = (grad_scale * head.gamma).sum(dim=1) + head.beta @ grad_shift
        grads["weight"] = a * (grad_a - (a * grad_a).sum())  # through the softmax
    return value, grads


@dataclass
class ProbeSettings:
    """The head and its optimisation; defaults are FLIP's LFWA settings (conf/protocol/token_probe.yaml)."""

    head: str = "flip"
    dropout: float = 0.0
    epochs: int = 100
    lr: float = 0.003
    batch_size: int = 128
    weight_decay: float = 0.05
    seed: int = 0
    # torch.compile the training step: True, False, or "auto" (runs of COMPILE_FROM_STEPS full
    # batches or more, where the compilation is paid back)
    compile: bool | str = "auto"


def _compiled_step(settings: ProbeSettings, rows: int, targets: ProbeTargets) -> Callable | None:
    """`batch_gradients` compiled, when `settings.compile` asks for it; None otherwise.

    The labels' row count is marked dynamic: the step indexes them by the batch's rows and is
    otherwise sized by the batch alone, so one compiled graph serves every training-set size
    (CelebA's split, LFWA's, the held-out part of either) and inductor's on-disk cache finds it
    in the next process instead of compiling again. If compiling fails (no C++ compiler on a CPU
    machine, say), the step falls back to eager with a warning: the result differs only by
    rounding.
    """
    if settings.compile not in (True, False, "auto"):
        raise ValueError(f"compile={settings.compile!r}: expected true, false or auto")
    steps = settings.epochs * (rows // settings.batch_size)
    if settings.compile is False or (settings.compile == "auto" and steps < COMPILE_FROM_STEPS):
        return None
    for labels in (targets.y, targets.mask, targets.values, targets.value_mask):
        if labels is not None and len(labels) > 1:  # torch.compile never treats 0 or 1 as dynamic
            torch._dynamo.mark_dynamic(labels, 0)
    compiled = torch.compile(batch_gradients, dynamic=False)
    state = {"failed": False}

    def step(*args: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not state["failed"]:
            try:
                return compiled(*args)
            except Exception as exc:  # any compiler failure: run eager instead
                state["failed"] = True
                log.warning("token probe: torch.compile failed (%s); training eagerly", exc)
        return batch_gradients(*args)

    return step


@torch.no_grad()
def predict(
    head: TokenHead, x: torch.Tensor, rows: torch.Tensor | None = None, chunk: int = 8192
) -> torch.Tensor:
    """The head's outputs for `rows` of the normalised vectors x (all rows when None)."""
    was_training = head.training
    head.eval()
    n = len(x) if rows is None else len(rows)
    out = []
    for start in range(0, n, chunk):
        batch = x[start : start + chunk] if rows is None else x.index_select(0, rows[start : start + chunk])
        out.append(head(batch))
    head.train(was_training)
    return torch.cat(out) if out else head.linear.weight.new_zeros(0, head.linear.out_features)


@contextmanager
def flushing_denormals() -> Iterator[None]:
    """CPU arithmetic with denormal floats flushed to zero, restored on exit.

    A head stuck at zero (say, a weight and its LayerNorm scale decayed together) keeps being
    shrunk by weight decay into denormal magnitudes, where every CPU operation on them is many
    times slower; flushing them changes nothing else.
    """
    was_on = bool((torch.tensor([1e-39]) * torch.tensor([1.0])).item() == 0.0)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def _adamw(params: Sequence[nn.Parameter], settings: ProbeSettings) -> torch.optim.Optimizer:
    """AdamW with weight decay on every parameter, as FLIP's script; the fused kernel where torch has one."""
    try:
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def fit_token_probe(
    x: torch.Tensor,
    targets: ProbeTargets,
    settings: ProbeSettings,
    rows: torch.Tensor | None = None,
    on_epoch: Callable[[int, TokenHead], None] | None = None,
) -> TokenHead:
    """Train a head on the normalised vectors x [N, V, D] (`rows` of them; all when None).

    Each epoch: a seeded permutation, index-sliced batches, AdamW at the epoch's cosine learning
    rate (FLIP's per-epoch schedule from `lr` to 0); then `on_epoch(epoch, head)` (1-based).
    Seeded: the same inputs and settings give the same head, and the global RNG is untouched.
    Denormals are flushed to zero while it trains (`flushing_denormals`).
    """
    device = x.device
    rows = torch.arange(len(x), device=device) if rows is None else rows.to(device)
    with flushing_denormals(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        head = TokenHead(x.shape[1], x.shape[2], targets.outputs, settings.head, settings.dropout).to(device)
        parameters = dict(head.named_parameters())
        optimizer = _adamw(list(parameters.values()), settings)
        compiled = _compiled_step(settings, len(rows), targets)
        generator = torch.Generator(device="cpu").manual_seed(settings.seed)
        for epoch in range(settings.epochs):
            lr = 0.5 * settings.lr * (1.0 + math.cos(math.pi * epoch / settings.epochs))
            for group in optimizer.param_groups:
                group["lr"] = lr
            head.train()
            order = rows[torch.randperm(len(rows), generator=generator).to(device)]
            for batch in order.split(settings.batch_size):
                step = (
                    compiled
                    if compiled is not None and len(batch) == settings.batch_size
                    else batch_gradients
                )
                keep = head.dropout_keep(len(batch), device)
                with torch.no_grad():
                    _, grads = step(head, x.index_select(0, batch), batch, targets, keep, False)
                for name, param in parameters.items():
                    param.grad = grads[name]
                optimizer.step()
            if on_epoch is not None:
                on_epoch(epoch + 1, head)
    return head
