"""FLIP: contrastive face-language pretraining and evaluation."""

from __future__ import annotations

from typing import Any

from flip.config import register_resolvers

register_resolvers()

__all__ = ["load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `flip.load` imports torch and open_clip; deferring it keeps light tools (flip-data,
    # the FaceShapes generator) from paying seconds of imports they never use
    if name == "load":
        from flip.checkpoint import load

        return load
    raise AttributeError(f"module 'flip' has no attribute {name!r}")
