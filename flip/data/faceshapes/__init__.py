"""FaceShapes: a procedural face-caption dataset that ships inside the framework.

No face dataset can be downloaded everywhere the framework must run, so it draws its own:
cartoon faces with known attributes and captions that state them (present and absent),
written as webdataset shards that the ordinary shard pipeline reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flip.data.faceshapes.attributes import BINARY_ATTRIBUTES, MULTICLASS_ATTRIBUTES, sample_attributes
from flip.data.faceshapes.grammar import FACESHAPES_GRAMMAR
from flip.data.faceshapes.render import render_face

if TYPE_CHECKING:
    from flip.data.faceshapes.generate import FaceShapesManifest, ensure_faceshapes

__all__ = [
    "BINARY_ATTRIBUTES",
    "FACESHAPES_GRAMMAR",
    "MULTICLASS_ATTRIBUTES",
    "FaceShapesManifest",
    "ensure_faceshapes",
    "render_face",
    "sample_attributes",
]

_LAZY = {"FaceShapesManifest", "ensure_faceshapes"}


def __getattr__(name: str) -> Any:
    # the generator pulls in webdataset and multiprocessing; importing it lazily also keeps
    # `python -m flip.data.faceshapes.generate` free of runpy's double-import warning
    if name in _LAZY:
        from flip.data.faceshapes import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
