"""FLIP: contrastive face-language pretraining and evaluation."""

from __future__ import annotations

from typing import Any

from flip.config import __version__, register_resolvers

register_resolvers()

__all__ = ["__version__", "load", "query"]


def __getattr__(name: str) -> Any:
    # `flip.load` imports torch and open_clip; deferring it keeps light tools (flip-data,
    # the FaceShapes generator) from paying seconds of imports they never use
    if name == "load":
        from flip.checkpoint import load

        return load
    if name == "query":
        from flip.evaluation.attribute_query import query

        return query
    raise AttributeError(f"module 'flip' has no attribute {name!r}")
