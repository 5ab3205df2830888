"""The token probe: FLIP's and FaRL's attribute head on a frozen image tower's block vectors.

Per chosen block the class token and the mean and max of the patch tokens
(flip.evaluation.token_features), each LayerNorm-ed, summed with learned weights, then one
linear layer; trained with AdamW and a per-epoch cosine schedule to 0, as FLIP's
celeba_recognition.py does. Two released heads:

- `flip` (FLIP's Celeba_Recognition): one LayerNorm shared by all vectors, raw learned weights
  (no softmax), Linear;
- `facer` (facer's VITClassificationHeadV0, the FaRL attribute head): a LayerNorm per vector,
  softmax-normalised weights, dropout, Linear.

Both LayerNorms start by normalising each vector over its width, a step with no parameters:
it is done once, in place, on the cached vectors. What is left is linear in the vectors, so a
batch costs a gather, one pass for the weighted sum and one for its gradients (written out in
`TokenHead.step_gradients`; autograd only from the loss to the logits). Batches are index
slices of one tensor, not a DataLoader. Loss by task: BCE-with-logits for attributes
(-1 = unlabelled, masked out), cross-entropy for classes, and for multitask splits
cross-entropy per question plus L1 per regression value (on the value standardised with the
training rows' mean and std, reported back in its own units: MAE and CS@5, the fraction
within 5).

Selection: `honest` picks the epoch on the validation split (or a seeded hold-out of train,
not refit) and reports the test figure at that epoch; `test_as_published` adds the test
figure at the best epoch on the test set itself, what FLIP's and FaRL's code reported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flip.evaluation.features import BenchmarkFeatures, SplitFeatures, model_device
from flip.evaluation.metrics import attribute_scores, classification_scores, multiclass_metrics
from flip.evaluation.token_features import benchmark_token_vectors, tower_depth
from flip.models import FlipModel
from flip.models.probe_tokens import resolve_probe_blocks

log = logging.getLogger(__name__)

HEADS = ("flip", "facer")
COMPILE_FROM_STEPS = 20_000
SELECTIONS = ("honest", "test_as_published")
AS_PUBLISHED = "selected on test, as published"
LAYER_NORM_EPS = 1e-5  # open_clip's and FLIP's LayerNorm
WITHIN_YEARS = 5.0  # CS@5


def normalize_vectors_(x: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """LayerNorm without its affine part, of every vector [..., width], in place (in row chunks,
    so no second copy of the cached vectors is made)."""
    for block in x.split(chunk):
        block.copy_(F.layer_norm(block, block.shape[-1:], eps=LAYER_NORM_EPS))
    return x


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
    head: TokenHead, z: torch.Tensor, rows: torch.Tensor, targets: ProbeTargets, keep: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a training batch (vectors z of the training `rows`) and the gradient of every
    head parameter, by name.

    Written out rather than left to autograd: the head is h = sum_v scale_v * z_v + shift, so
    one pass over the batch's vectors gives h and one more d loss / d scale, from which every
    parameter's gradient follows in a few [V, D]-sized products. Plain tensor code, so
    torch.compile can fuse each pass into one kernel (`compile` in ProbeSettings). The batch is
    gathered before: both passes then read it from cache, not the cached vectors twice.
    """
    a = head.mixing()
    scale, shift = head.scale_shift()
    h = (z * scale).sum(dim=1) + shift
    used = h if keep is None else h * keep
    weight, bias = head.linear.weight, head.linear.bias
    value, grad_logits = targets.loss_gradient(torch.addmm(bias, used, weight.T), rows)
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


# -- targets and losses by task ----------------------------------------------------------------


@dataclass
class ProbeTargets:
    """A split's labels as tensors, and what the head's outputs mean for them.

    Multitask: the outputs are each question's class logits in order, then one output per
    regression value (standardised by `value_stats`, the training rows' mean and std).
    """

    task: str
    outputs: int
    y: torch.Tensor  # attributes [N, A] 0/1 float; classes [N]; multitask questions [N, Q] (-1 unlabelled)
    mask: torch.Tensor | None = None  # attributes: labelled entries
    values: torch.Tensor | None = None  # multitask: standardised values [N, R] (0 where unlabelled)
    value_mask: torch.Tensor | None = None
    slices: list[tuple[str, slice]] = field(default_factory=list)  # multitask question -> outputs
    value_names: list[str] = field(default_factory=list)
    value_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(
        cls,
        split: Any,
        device: torch.device | str = "cpu",
        value_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
        rows: np.ndarray | None = None,
    ) -> ProbeTargets:
        """Targets of a LabelledSplit; regression stats from `value_stats`, else from `rows` (all)."""
        if split.task == "attributes":
            y = torch.as_tensor(split.targets, dtype=torch.int8)
            return cls("attributes", y.shape[1], y.clamp(min=0).float().to(device), mask=(y >= 0).to(device))
        if split.task == "classification":
            y = torch.as_tensor(split.targets, dtype=torch.int64).to(device)
            return cls("classification", len(split.label_names), y)
        if split.task != "multitask":
            raise ValueError(
                f"{split.benchmark}/{split.split}: the token probe trains on attributes, classes or "
                f"multitask labels, not {split.task!r}"
            )
        slices, start, columns = [], 0, []
        for question, (classes, labels) in split.questions.items():
            slices.append((question, slice(start, start + len(classes))))
            start += len(classes)
            columns.append(torch.as_tensor(labels, dtype=torch.int64))
        n = len(split)
        y = torch.stack(columns, dim=1) if columns else torch.zeros(n, 0, dtype=torch.int64)
        names = list(split.values)
        raw = torch.as_tensor(
            np.stack([split.values[v] for v in names], axis=1) if names else np.zeros((n, 0))
        )
        raw = raw.to(torch.float32)
        labelled = torch.isfinite(raw)
        if value_stats is None:
            fit = raw if rows is None else raw[torch.as_tensor(rows)]
            ok = torch.isfinite(fit)
            count = ok.sum(dim=0).clamp(min=1)
            mean = torch.where(ok, fit, 0).sum(dim=0) / count
            var = torch.where(ok, (fit - mean) ** 2, 0).sum(dim=0) / count
            value_stats = (mean, var.sqrt().clamp(min=1e-6))
        mean, std = value_stats
        values = torch.where(labelled, (raw - mean) / std, 0)
        return cls(
            "multitask",
            start + len(names),
            y.to(device),
            values=values.to(device),
            value_mask=labelled.to(device),
            slices=slices,
            value_names=names,
            value_stats=(mean, std),
        )

    def loss(self, logits: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        """The mean loss of a batch of rows (labelled entries only)."""
        if self.task == "attributes":
            mask = self.mask[rows]
            bce = F.binary_cross_entropy_with_logits(logits, self.y[rows], reduction="none")
            return (bce * mask).sum() / mask.sum().clamp(min=1)
        if self.task == "classification":
            return F.cross_entropy(logits, self.y[rows])
        y = self.y[rows]
        total = logits.new_zeros(())
        for q, (_, outputs) in enumerate(self.slices):
            labels = y[:, q]
            ce = F.cross_entropy(logits[:, outputs], labels, ignore_index=-1, reduction="sum")
            total = total + ce / (labels >= 0).sum().clamp(min=1)
        if self.value_names:
            mask = self.value_mask[rows]
            l1 = (logits[:, -len(self.value_names) :] - self.values[rows]).abs() * mask
            total = total + (l1.sum(dim=0) / mask.sum(dim=0).clamp(min=1)).sum()
        return total

    def loss_gradient(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`loss` and its gradient wrt the logits, written out (the training step's autograd-free path)."""
        if self.task == "attributes":
            mask = self.mask[rows].to(logits.dtype)
            count = mask.sum().clamp(min=1)
            y = self.y[rows]
            bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
            return (bce * mask).sum() / count, (torch.sigmoid(logits) - y) * mask / count
        if self.task == "classification":
            y = self.y[rows]
            log_p = torch.log_softmax(logits, dim=1)
            value = -log_p.gather(1, y[:, None]).mean()
            return value, (log_p.exp() - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / len(y)
        y = self.y[rows]
        value = logits.new_zeros(())
        grad = torch.zeros_like(logits)
        for q, (_, outputs) in enumerate(self.slices):
            labels = y[:, q]
            valid = (labels >= 0).to(logits.dtype)
            count = valid.sum().clamp(min=1)
            log_p = torch.log_softmax(logits[:, outputs], dim=1)
            safe = labels.clamp(min=0)
            value = value - (log_p.gather(1, safe[:, None]).squeeze(1) * valid).sum() / count
            onehot = F.one_hot(safe, log_p.shape[1]).to(logits.dtype)
            grad[:, outputs] = (log_p.exp() - onehot) * valid[:, None] / count
        if self.value_names:
            r = len(self.value_names)
            mask = self.value_mask[rows].to(logits.dtype)
            count = mask.sum(dim=0).clamp(min=1)
            diff = logits[:, -r:] - self.values[rows]
            value = value + ((diff.abs() * mask).sum(dim=0) / count).sum()
            grad[:, -r:] = torch.sign(diff) * mask / count
        return value, grad


def regression_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | int]:
    """MAE and CS@5 (the fraction of predictions within 5 units) over the labelled (finite) values."""
    labelled = np.isfinite(y_true)
    error = np.abs(y_pred[labelled] - y_true[labelled])
    nan = float("nan")
    return {
        "mae": float(error.mean()) if len(error) else nan,
        "cs5": float((error <= WITHIN_YEARS).mean()) if len(error) else nan,
        "support": int(labelled.sum()),
    }


def score_outputs(logits: torch.Tensor, split: Any, targets: ProbeTargets) -> dict[str, Any]:
    """summary + per_label (+ confusion matrix, or multiclass and regression blocks) of the head's
    outputs on a split, in the metrics.json schema of the other probes."""
    logits = logits.float().cpu()
    names = list(split.label_names)
    if targets.task == "attributes":
        summary, per_label = attribute_scores(split.targets, (logits > 0).numpy(), names)
        return {"summary": summary, "per_label": per_label}
    if targets.task == "classification":
        summary, per_label, confusion = classification_scores(split.targets, logits.argmax(1).numpy(), names)
        return {"summary": summary, "per_label": per_label, "confusion_matrix": confusion}
    summary: dict[str, float] = {}
    multiclass, regression = {}, {}
    for question, outputs in targets.slices:
        classes, y = split.questions[question]
        keep = y >= 0
        pred = logits[:, outputs].argmax(dim=1).numpy()
        m = multiclass_metrics(y[keep], pred[keep], classes)
        m["confusion_matrix"] = classification_scores(y[keep], pred[keep], classes)[2]
        multiclass[question] = m
        summary[f"{question}_accuracy"] = m["accuracy"]
        summary[f"{question}_mean_per_class_recall"] = m["mean_per_class_recall"]
    if targets.value_names:
        mean, std = targets.value_stats
        predicted = (logits[:, -len(targets.value_names) :] * std + mean).numpy()
        for r, name in enumerate(targets.value_names):
            regression[name] = regression_scores(np.asarray(split.values[name], dtype=float), predicted[:, r])
            summary[f"{name}_mae"] = regression[name]["mae"]
            summary[f"{name}_cs5"] = regression[name]["cs5"]
    out: dict[str, Any] = {"summary": summary, "per_label": {}}
    if multiclass:
        out["multiclass"] = multiclass
    if regression:
        out["regression"] = regression
    return out


# -- training ----------------------------------------------------------------------------------


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


def _compiled_step(settings: ProbeSettings, rows: int, device: torch.device) -> Callable | None:
    """`batch_gradients` compiled, when `settings.compile` asks for it; None otherwise.

    If compiling fails (no C++ compiler on a CPU machine, say), the step falls back to eager
    with a warning: the result differs only by rounding.
    """
    if settings.compile not in (True, False, "auto"):
        raise ValueError(f"compile={settings.compile!r}: expected true, false or auto")
    steps = settings.epochs * (rows // settings.batch_size)
    if settings.compile is False or (settings.compile == "auto" and steps < COMPILE_FROM_STEPS):
        return None
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
    return torch.cat(out) if out else x.new_zeros(0, head.linear.out_features)


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
    """
    device = x.device
    rows = torch.arange(len(x), device=device) if rows is None else rows.to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        head = TokenHead(x.shape[1], x.shape[2], targets.outputs, settings.head, settings.dropout).to(device)
        parameters = dict(head.named_parameters())
        optimizer = _adamw(list(parameters.values()), settings)
        compiled = _compiled_step(settings, len(rows), device)
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
                    _, grads = step(head, x.index_select(0, batch), batch, targets, keep)
                for name, param in parameters.items():
                    param.grad = grads[name]
                optimizer.step()
            if on_epoch is not None:
                on_epoch(epoch + 1, head)
    return head


# -- the protocol ------------------------------------------------------------------------------


def _selection_score(scored: dict[str, Any], task: str, loss: float) -> float:
    """What picks the epoch: the papers' headline metric (mean accuracy over attributes, accuracy
    over classes); for multitask splits, whose metrics mix accuracies and errors, the loss."""
    if task == "attributes":
        value = scored["summary"]["mean_accuracy"]
    elif task == "classification":
        value = scored["summary"]["accuracy"]
    else:
        value = -loss
    return -math.inf if math.isnan(value) else float(value)


@dataclass
class _Tracker:
    """The best epoch of one scoring split and the head's parameters then (ties: the earlier epoch)."""

    x: torch.Tensor
    rows: torch.Tensor | None
    targets: ProbeTargets
    split: Any
    scores: list[float] = field(default_factory=list)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.rows is not None:
            self.split = self.split.subset(self.rows.cpu().numpy())

    def __call__(self, epoch: int, head: TokenHead) -> None:
        logits = predict(head, self.x, self.rows)
        loss_rows = slice(None) if self.rows is None else self.rows
        loss = float(self.targets.loss(logits, loss_rows)) if self.targets.task == "multitask" else 0.0
        score = _selection_score(score_outputs(logits, self.split, self.targets), self.targets.task, loss)
        self.scores.append(score)
        if self.best is None or score > self.best[0]:
            state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            self.best = (score, epoch, state)


@dataclass
class TokenProbe:
    """The token-probe protocol (conf/protocol/token_probe.yaml): a head trained on the vectors
    of `train_split` (a seeded subsample of `max_train`), its epoch chosen on `val_split`
    (`max_val`; or a seeded `holdout` part of train when it is None), tested on the evaluated
    split. `blocks`: 1-based block numbers and "final" (None: FLIP's choice at the tower's depth).
    """

    train_split: str
    val_split: str | None = None
    max_train: int | None = None
    max_val: int | None = None
    blocks: Sequence[int | str] | None = None
    head: str = "flip"
    dropout: float = 0.0
    selection: str = "honest"
    epochs: int = 100
    lr: float = 0.003
    batch_size: int = 128
    weight_decay: float = 0.05
    seed: int = 0
    holdout: float = 0.2
    compile: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"protocols.token_probe.head={self.head!r}: expected one of {HEADS}")
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"protocols.token_probe.selection={self.selection!r}: expected one of {SELECTIONS}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs={self.epochs} and batch_size={self.batch_size} must be at least 1")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout={self.holdout} must be in (0, 1)")

    @property
    def settings(self) -> ProbeSettings:
        return ProbeSettings(
            self.head,
            self.dropout,
            self.epochs,
            self.lr,
            self.batch_size,
            self.weight_decay,
            self.seed,
            self.compile,
        )

    def __call__(
        self, model: FlipModel, features: BenchmarkFeatures, checkpoint: str | None = None
    ) -> dict[str, Any]:
        depth = tower_depth(model)
        blocks = resolve_probe_blocks(self.blocks, depth) if depth else self.blocks
        train = benchmark_token_vectors(features, self.train_split, blocks, self.max_train, self.seed)
        val = (
            benchmark_token_vectors(features, self.val_split, blocks, self.max_val, self.seed)
            if self.val_split
            else None
        )
        test = benchmark_token_vectors(features, None, blocks)
        return self.metrics(train, test, val, checkpoint, model_device(model), blocks)

    def metrics(
        self,
        train: SplitFeatures,
        test: SplitFeatures,
        val: SplitFeatures | None,
        checkpoint: str | None,
        device: torch.device | str = "cpu",
        blocks: Sequence[int | str] | None = None,
    ) -> dict[str, Any]:
        """metrics.json of the probe. The vectors of the three splits are normalised in place."""
        for other in (s for s in (train, val) if s is not None):
            same = (
                other.split.task,
                other.split.label_names,
                list(other.split.questions),
                list(other.split.values),
            )
            if same != (
                test.split.task,
                test.split.label_names,
                list(test.split.questions),
                list(test.split.values),
            ):
                raise ValueError(
                    f"{other.split.split} and {test.split.split} disagree on their labels: "
                    f"{other.split.label_names or list(other.split.questions)} vs "
                    f"{test.split.label_names or list(test.split.questions)}"
                )
        device = torch.device(device)
        x_train = normalize_vectors_(train.features.to(device, torch.float32))
        x_test = normalize_vectors_(test.features.to(device, torch.float32))
        fit_rows: torch.Tensor | None = None
        if val is None:
            order = np.random.default_rng(self.seed + 1).permutation(len(train.split))
            held = max(1, round(self.holdout * len(order)))
            fit_rows = torch.as_tensor(np.sort(order[held:]), device=device)
            check_rows = torch.as_tensor(np.sort(order[:held]), device=device)
            train_targets = ProbeTargets.of(train.split, device, rows=fit_rows.cpu().numpy())
            chooser = _Tracker(x_train, check_rows, train_targets, train.split)
            selected_on = f"held-out {self.holdout:.0%} of {train.split.split} (not refit)"
        else:
            train_targets = ProbeTargets.of(train.split, device)
            x_val = normalize_vectors_(val.features.to(device, torch.float32))
            val_targets = ProbeTargets.of(val.split, device, train_targets.value_stats)
            chooser = _Tracker(x_val, None, val_targets, val.split)
            selected_on = val.split.split
        test_targets = ProbeTargets.of(test.split, device, train_targets.value_stats)
        on_test = (
            _Tracker(x_test, None, test_targets, test.split)
            if self.selection == "test_as_published"
            else None
        )

        def on_epoch(epoch: int, head: TokenHead) -> None:
            chooser(epoch, head)
            if on_test is not None:
                on_test(epoch, head)

        head = fit_token_probe(x_train, train_targets, self.settings, fit_rows, on_epoch)
        _, epoch, state = chooser.best
        head.load_state_dict(state)
        scored = score_outputs(predict(head, x_test), test.split, test_targets)
        metrics: dict[str, Any] = {
            "benchmark": test.split.benchmark,
            "protocol": "token_probe",
            "task": test.split.task,
            "checkpoint": checkpoint,
            "split": test.split.split,
            "n_train": len(train.split) if fit_rows is None else len(fit_rows),
            "n_test": len(test.split),
            "labels": list(test.split.label_names) or list(test.split.questions) + list(test.split.values),
            **scored,
            "selected": {"epoch": epoch, "on": selected_on, "scores": chooser.scores},
            "train_split": train.split.split,
            "val_split": None if val is None else val.split.split,
            "blocks": None if blocks is None else list(blocks),
            "vectors": int(x_train.shape[1]),
            "head": self.head,
            "settings": {
                "dropout": self.dropout,
                "epochs": self.epochs,
                "lr": self.lr,
                "batch_size": self.batch_size,
                "weight_decay": self.weight_decay,
                "seed": self.seed,
                "selection": self.selection,
            },
        }
        if on_test is not None:
            _, test_epoch, test_state = on_test.best
            head.load_state_dict(test_state)
            published = score_outputs(predict(head, x_test), test.split, test_targets)
            metrics["as_published"] = {
                "label": AS_PUBLISHED,
                "summary": published["summary"],
                "selected": {"epoch": test_epoch, "scores": on_test.scores},
            }
        return metrics
