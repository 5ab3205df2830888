"""The models users compare against, loaded into the one interface evaluation uses (`FlipModel`).

One spec for every entry point (`baseline.*` in conf/eval_base.yaml, `flip-query`, `flip-convert`):

    format=open_clip  name=ARCH pretrained=TAG_OR_FILE   (or name=local-dir:DIR / hf-hub:ORG/NAME)
    format=farl       path=FaRL-Base-Patch16-LAIONFace20M-ep64.pth
    format=hf         path=HF_FOLDER_OR_HUB_ID            (CLIPModel, SiglipModel)
    format=flip_base  path=FLIP_BASE.pth text_model=bert-base-uncased

`format` may be left out when `name` is given (open_clip, as before). Every file is read with
`torch.load(weights_only=True)` or safetensors: nothing a user downloads runs code. The loaders
return the model and the checkpoint's tensors they did not use (logged too), by name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flip.models.baselines.weights import WeightsError
from flip.models.flip_model import FlipModel

FORMATS = {
    "open_clip": "an open_clip architecture: name=ARCH pretrained=TAG (downloaded by open_clip) or a local "
    "weights file in OpenAI/open_clip layout; or name=local-dir:DIR / hf-hub:ORG/NAME",
    "farl": "a FaRL checkpoint (FaRL-Base-Patch16-LAIONFace20M-ep16.pth / -ep64.pth): path=FILE",
    "hf": "a Hugging Face CLIPModel or SiglipModel: path=FOLDER or a hub id",
    "flip_base": "FLIP-Base (FaceCaption-15M): path=FILE, text_model=its BERT's config + tokenizer "
    "(bert-base-uncased, a hub id or a local folder)",
}
# local weight files read here, with their keys checked; others (big_vision .npz, ...) go to open_clip
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# the fields each format reads; another one given is a mistake (a path given to open_clip, say)
USES = {
    "open_clip": ("name", "pretrained", "cache_dir"),
    "farl": ("path", "name"),
    "hf": ("path",),
    "flip_base": ("path", "text_model"),
}
SPEC_KEYS = ("format", "name", "pretrained", "path", "text_model", "cache_dir")


@dataclass(frozen=True)
class BaselineSpec:
    """What `baseline.*` says: a format and where its weights are."""

    format: str | None = None
    name: str | None = None
    pretrained: str | None = None
    path: str | None = None
    text_model: str | None = None
    cache_dir: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> BaselineSpec:
        unknown = sorted(set(values) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"unknown baseline key(s) {unknown}; a baseline is given by {list(SPEC_KEYS)}")
        spec = cls(**{k: (None if v is None else str(v)) for k, v in values.items()})
        if spec.format is None and spec.name is not None:
            spec = cls(**{**asdict(spec), "format": "open_clip"})
        return spec

    @property
    def given(self) -> bool:
        return self.format is not None or self.name is not None or self.path is not None

    def label(self) -> str:
        """The name metrics.json records for the model."""
        if self.format == "open_clip":
            return f"open_clip:{self.name}:{self.pretrained}"
        return f"{self.format}:{self.path}"

    def identity(self) -> str:
        """A feature-cache key part: the spec and, for local files, their size and time."""

        def stat(value: str | None) -> Any:
            if value is None or not os.path.exists(value):
                return value
            path = Path(value)
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]

        return json.dumps({"baseline": self.format, "name": self.name, "pretrained": stat(self.pretrained),
                           "path": stat(self.path), "text_model": self.text_model})  # fmt: skip


@dataclass
class LoadedBaseline:
    model: FlipModel
    spec: BaselineSpec
    ignored: list[str] = field(default_factory=list)


def _require(spec: BaselineSpec, key: str) -> str:
    value = getattr(spec, key)
    if not value:
        raise ValueError(f"baseline.format={spec.format} needs baseline.{key}: {FORMATS[spec.format]}")
    return value


def load_baseline(spec: BaselineSpec | Mapping[str, Any]) -> LoadedBaseline:
    """The model `spec` names (eval mode, on the CPU) and the tensors of its file left unused."""
    if not isinstance(spec, BaselineSpec):
        spec = BaselineSpec.from_mapping(spec)
    if spec.format not in FORMATS:
        known = "; ".join(f"{name}: {text}" for name, text in FORMATS.items())
        raise ValueError(f"unknown baseline.format={spec.format!r}; known formats: {known}")
    unused = [k for k in SPEC_KEYS[1:] if getattr(spec, k) is not None and k not in USES[spec.format]]
    if unused:
        raise ValueError(
            f"baseline.format={spec.format} does not read baseline.{', baseline.'.join(unused)}; "
            f"it takes {', '.join(USES[spec.format])}: {FORMATS[spec.format]}"
        )
    ignored: list[str] = []
    if spec.format == "open_clip":
        from flip.models.baselines.openai_layout import load_openai_layout
        from flip.models.factory import build_model

        name = _require(spec, "name")
        local = spec.pretrained is not None and os.path.isfile(spec.pretrained)
        if local and spec.pretrained.endswith(STATE_DICT_SUFFIXES):
            model, ignored = load_openai_layout(
                spec.pretrained, name, "an OpenAI/open_clip-layout state dict"
            )
        else:
            model = build_model(name, pretrained=spec.pretrained, cache_dir=spec.cache_dir)
    elif spec.format == "farl":
        from flip.models.baselines.openai_layout import FARL_ARCH, load_openai_layout

        name = spec.name or FARL_ARCH
        model, ignored = load_openai_layout(
            _require(spec, "path"), name, "a FaRL checkpoint (OpenAI CLIP layout)"
        )
    elif spec.format == "hf":
        from flip.models.baselines.hf import load_hf

        model = load_hf(_require(spec, "path"))
    else:
        from flip.models.baselines.flip_base import load_flip_base

        model, ignored = load_flip_base(_require(spec, "path"), spec.text_model or "bert-base-uncased")
    return LoadedBaseline(model.eval(), spec, ignored)


__all__ = ["FORMATS", "BaselineSpec", "LoadedBaseline", "WeightsError", "load_baseline"]
