"""How fine-tuning adapts the image tower: frozen, fully trained, or with LoRA adapters (peft).

- `frozen`: the tower keeps its weights and runs in eval mode; only the head learns (a linear
  probe trained by gradient descent, with augmentation).
- `full`: every weight of the image tower learns (with layer-wise rate decay, see layer_decay.py).
- `lora`: the tower's weights stay as they were; peft adds low-rank adapters of rank `rank` to the
  layers named in `target_modules` (open_clip's ViT: the MLP's `c_fc` and `c_proj`) and to the
  weights named in `target_parameters` (the attention's query-key-value projection
  `in_proj_weight`), and only they and the head learn. For export the adapters are merged into
  the weights (`merged`), so the result is a plain model of the original architecture.

open_clip's ViT attention (torch's `nn.MultiheadAttention`, or with `block_type: custom`, as
FLIP's configs choose, open_clip's own) reads its query-key-value weight as a parameter instead
of calling a layer. peft adapts such a weight exactly through a parametrisation
(`target_parameters`); its support for torch's attention module as a whole merges the adapters
into the weights and subtracts them again on every forward, which leaves the "frozen" weights
drifting by rounding, so that (and a layer inside torch's attention) is refused.

The text tower and the temperature never learn here; they stay in the model so that an export
is a whole FLIP model (zero-shot questions, WiSE-FT with the model fine-tuning started from).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from flip.models import FlipModel

METHODS = ("frozen", "full", "lora")
DEFAULT_LORA_MODULES = ("c_fc", "c_proj")
DEFAULT_LORA_PARAMETERS = ("in_proj_weight",)


@dataclass(frozen=True)
class Adaptation:
    """conf/adapt/<method>.yaml: `method`, and for LoRA its rank, alpha, dropout and targets."""

    method: str = "full"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Sequence[str] = field(default_factory=lambda: list(DEFAULT_LORA_MODULES))
    target_parameters: Sequence[str] = field(default_factory=lambda: list(DEFAULT_LORA_PARAMETERS))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"adapt.method={self.method!r}: use one of {list(METHODS)}")
        if self.method == "lora":
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ValueError(f"adapt.rank={self.rank!r} must be an integer >= 1")
            if not self.target_modules and not self.target_parameters:
                raise ValueError(
                    f"adapt.target_modules and adapt.target_parameters are empty: name what to adapt, e.g. "
                    f"{list(DEFAULT_LORA_MODULES)} and {list(DEFAULT_LORA_PARAMETERS)}"
                )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Adaptation:
        known = {"method", "rank", "alpha", "dropout", "target_modules", "target_parameters"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"adapt has unknown keys {unknown}; it takes {sorted(known)}")
        return cls(**{k: (list(v) if k.startswith("target_") else v) for k, v in cfg.items()})

    def describe(self) -> dict[str, Any]:
        """What metrics.json and reports say of the adaptation ("label": frozen, LoRA r=8, full)."""
        if self.method == "lora":
            return {"method": "lora", "rank": self.rank, "label": f"LoRA r={self.rank}"}
        return {"method": self.method, "label": self.method}

    def apply(self, model: FlipModel) -> FlipModel:
        """Freeze what does not learn and, for LoRA, wrap the image tower with its adapters (in place)."""
        model.requires_grad_(False)
        if self.method == "full":
            model.clip.visual.requires_grad_(True)
        elif self.method == "lora":
            model.clip.visual = self._with_adapters(model.clip.visual)
        return model

    def _with_adapters(self, visual: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model  # imported only for LoRA: it takes seconds

        _refuse_attention_modules(visual, self.target_modules)
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            target_parameters=list(self.target_parameters),
        )
        adapted = get_peft_model(visual, config)
        _settle_parameter_order(adapted)
        return adapted

    def merged(self, model: FlipModel) -> FlipModel:
        """A copy of `model` whose image tower has the adapters merged into its weights (LoRA), or
        a plain copy: the architecture fine-tuning started from, for export and evaluation."""
        copied = copy.deepcopy(model)
        if self.method == "lora":
            copied.clip.visual = copied.clip.visual.merge_and_unload()
        return copied.requires_grad_(False).eval()


def _refuse_attention_modules(visual: nn.Module, targets: Sequence[str]) -> None:
    """torch's MultiheadAttention, or a layer inside it, named as a LoRA target module: the first
    leaves the frozen weights drifting (see the module doc), the second would be trained on nothing
    (the attention reads `out_proj.weight` and never calls the layer, while the merge adds it)."""

    def named(full: str) -> bool:
        return any(full == t or full.endswith(f".{t}") for t in targets)

    for name, module in visual.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        inside = [f"{name}.{child}" for child, _ in module.named_children() if named(f"{name}.{child}")]
        if named(name) or inside:
            raise ValueError(
                f"adapt.target_modules={list(targets)} names {(inside or [name])[0]!r}, part of torch's "
                f"MultiheadAttention, which peft cannot adapt exactly as a module; adapt its weights "
                f"through adapt.target_parameters, e.g. [in_proj_weight]"
            )


def _settle_parameter_order(adapted: nn.Module) -> None:
    """Register each parameter peft adapts through a parametrisation again, last in its module.

    peft adds the parametrisation for each forward and removes it after, and the removal
    registers the parameter again, last in its module: the order of `parameters()` changes at the
    first forward. Lightning's weight averaging copies the module before that forward and pairs
    its parameters with the copy's by that order, so the order is made the lasting one now.
    """
    from peft.tuners.lora.layer import ParamWrapper

    for module in adapted.modules():
        if isinstance(module, ParamWrapper):
            base = module.get_base_layer()
            param = base._parameters.pop(module.parameter_name)
            base.register_parameter(module.parameter_name, param)
