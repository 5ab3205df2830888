"""A weighted sum of loss terms, built from the Hydra `loss` config group.

Every term is a module with a class attribute `requires_tokens` and a method
`loss_from_outputs(EncoderOutput) -> Tensor`, so the training module asks only this object
whether the model must return token features, and never needs to know which losses exist.

A term that needs the batch itself (a momentum encoder's features: `MomentumItcLoss`) sets
`requires_inputs = True` and has `bind(model)` (called once the online model exists),
`encode_inputs(images, text)` (its result goes to `loss_from_outputs(outputs, encoded)`) and
`after_optimizer_step(model)` (called by the training module after each optimizer step); one
whose state cannot live under ZeRO-3's partitioned weights sets `supports_zero3 = False`. A term
that scores with a part of the model (the ITM head: `ItmLoss`) has `bind(model)` alone. A term
whose weighting follows training (the foil choice schedule of `ClipLoss` and `FilipLoss`) has
`at_step(step)`, called with the trainer's optimizer step before each training step's forward;
one that reads foils' token features only at some steps (`FilipLoss`) has
`reads_foil_tokens(foil_mask)`, which the training module asks before the model encodes them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from torch import nn

from flip.config import check_moved_keys
from flip.models.outputs import EncoderOutput

CONFIG_KEYS = ("terms",)
TERM_KEYS = ("weight", "loss")
BUILT_IN = (
    "flip.losses.ClipLoss",
    "flip.losses.SigLipLoss",
    "flip.losses.FilipLoss",
    "flip.losses.MomentumItcLoss",
    "flip.losses.ItmLoss",
)
_FROM_TRAINER = ("rank", "world_size")


class CombinedLoss(nn.Module):
    """`forward` returns each term's unweighted value under its name, and their weighted sum as "loss"."""

    def __init__(self, terms: Mapping[str, tuple[nn.Module, float]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("CombinedLoss needs at least one term")
        if "loss" in terms:
            raise ValueError('"loss" is reserved for the weighted sum; give the term another name')
        for name, (module, _) in terms.items():
            if not hasattr(module, "loss_from_outputs") or not hasattr(module, "requires_tokens"):
                raise TypeError(
                    f"loss term {name!r} ({type(module).__name__}) needs a `requires_tokens` class attribute "
                    f"and a `loss_from_outputs(outputs: EncoderOutput)` method"
                )
        self.terms = nn.ModuleDict({name: module for name, (module, _) in terms.items()})
        self.weights = {name: float(weight) for name, (_, weight) in terms.items()}

    @property
    def requires_tokens(self) -> bool:
        return any(term.requires_tokens for term in self.terms.values())

    def reads_foil_tokens(self, foil_mask: torch.Tensor | None) -> bool:
        """Whether a term reads the foils' token features at this step (FilipLoss's)."""
        return any(
            term.reads_foil_tokens(foil_mask)
            for term in self.terms.values()
            if hasattr(term, "reads_foil_tokens")
        )

    @property
    def requires_inputs(self) -> bool:
        return any(getattr(term, "requires_inputs", False) for term in self.terms.values())

    def bind(self, model: nn.Module) -> None:
        for term in self.terms.values():
            if hasattr(term, "bind"):
                term.bind(model)

    def at_step(self, step: int) -> None:
        for term in self.terms.values():
            if hasattr(term, "at_step"):
                term.at_step(step)

    def after_optimizer_step(self, model: nn.Module) -> None:
        for term in self.terms.values():
            if hasattr(term, "after_optimizer_step"):
                term.after_optimizer_step(model)

    def forward(
        self, outputs: EncoderOutput, images: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        # before the float32 block: a momentum encoder runs in the precision the online one ran in
        encoded = {
            name: term.encode_inputs(images, text)
            for name, term in self.terms.items()
            if getattr(term, "requires_inputs", False) and images is not None
        }
        # Losses run in float32 even under bf16/fp16 autocast: logits are dot products of unit
        # vectors scaled by up to 100, and an 8-bit mantissa rounds away the small differences
        # between a positive and its hard negatives that late training lives on.
        with torch.autocast(outputs.image_features.device.type, enabled=False):
            outputs = outputs.float()
            values = {
                name: term.loss_from_outputs(outputs, encoded[name].float())
                if name in encoded
                else term.loss_from_outputs(outputs)
                for name, term in self.terms.items()
            }
        total = sum(self.weights[name] * value for name, value in values.items())
        return {**values, "loss": total}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={weight:g}" for name, weight in self.weights.items())


def _term(name: str, term: Any, rank: int, world_size: int) -> tuple[nn.Module, float]:
    where = f"loss.terms.{name}"
    if not isinstance(term, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {list(TERM_KEYS)}, got {term!r}")
    unknown = sorted(set(term) - set(TERM_KEYS))
    if unknown or "loss" not in term:
        problem = f"has unknown key(s) {unknown}" if unknown else "lacks the `loss` key"
        raise ValueError(f"{where} {problem}; accepted keys: {list(TERM_KEYS)} (weight defaults to 1.0)")
    weight = term.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"{where}.weight must be a number, got {weight!r}")
    node = term["loss"]
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ValueError(f"{where}.loss needs a `_target_`, one of {list(BUILT_IN)} or your own class")
    target = node["_target_"]
    try:
        cls = get_class(target)
    except Exception as err:
        raise ValueError(
            f"{where}.loss._target_ {target!r} cannot be imported ({err}); built-in: {list(BUILT_IN)}"
        ) from err
    params = [p for p in inspect.signature(cls).parameters if p != "self"]
    given = [key for key in node if not (key.startswith("_") and key.endswith("_"))]
    fixed = sorted(set(given) & set(_FROM_TRAINER))
    unknown = sorted(set(given) - set(params))
    if fixed or unknown:
        problem = f"sets {fixed}, which the trainer passes" if fixed else f"has unknown key(s) {unknown}"
        accepted = [p for p in params if p not in _FROM_TRAINER]
        raise ValueError(f"{where}.loss {problem}; {target} accepts {accepted}")
    try:
        module = instantiate(node, rank=rank, world_size=world_size)
    except InstantiationException as err:
        raise ValueError(f"{where}.loss: {err.__cause__ or err}") from err
    return module, float(weight)


def build_loss(cfg: Mapping, rank: int = 0, world_size: int = 1) -> CombinedLoss:
    """The CombinedLoss of a `loss` config (conf/loss/*.yaml) for this rank of world_size.

    A loss config only chooses terms and weights. The temperature and bias the terms score
    with are parameters of the model, initialised from the model config, so that a checkpoint
    rebuilds its model from the model config alone.
    """
    check_moved_keys(f"loss.{key}" for key in cfg)
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the loss config; accepted: {list(CONFIG_KEYS)}")
    terms = cfg.get("terms")
    if not isinstance(terms, Mapping) or not terms:
        raise ValueError("loss.terms must map term names to {weight, loss}; see conf/loss/clip.yaml")
    return CombinedLoss({name: _term(str(name), term, rank, world_size) for name, term in terms.items()})
