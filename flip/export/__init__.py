"""Use a FLIP model without FLIP: export to open_clip, ONNX or plain safetensors.

`export(model_or_checkpoint, out, format)` writes one folder, atomically (built beside `out`,
renamed into place once complete and checked; removed on any failure). `overwrite=True`
replaces only a previous export (flip.export.layout), never a folder holding anything else.
The console script `flip-export` wraps it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flip.checkpoint import load
from flip.export.files import staged_folder
from flip.export.layout import not_an_export
from flip.export.onnx_format import OnnxCheckError, write_onnx_folder
from flip.export.open_clip_format import OpenClipExportError, open_clip_model_config, write_open_clip_folder
from flip.export.safetensors_format import write_safetensors_folder
from flip.models import FlipModel

WRITERS: dict[str, Callable[[FlipModel, Path], dict[str, Any]]] = {
    "open_clip": write_open_clip_folder,
    "onnx": write_onnx_folder,
    "safetensors": write_safetensors_folder,
}
FORMATS = tuple(WRITERS)


def export(
    model: FlipModel | str | os.PathLike, out: str | os.PathLike, format: str, overwrite: bool = False
) -> dict[str, Any]:
    """Write `model` (or what `flip.load` reads from that path) to the folder `out` in `format`."""
    if format not in WRITERS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    with staged_folder(out, overwrite=overwrite, not_replaceable=not_an_export) as folder:
        if not isinstance(model, FlipModel):
            model = load(model)
        report = WRITERS[format](model.eval(), folder)
    files = sorted(p.name for p in Path(out).iterdir())
    return {"format": format, "out": str(out), "files": files, **report}


__all__ = [
    "FORMATS",
    "OnnxCheckError",
    "OpenClipExportError",
    "export",
    "open_clip_model_config",
]
