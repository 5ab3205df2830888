"""Writing an export folder: all of it or none of it, with weights in safetensors.

An export is read by other programs (open_clip, onnxruntime, CLIP_benchmark) that trust what
they find. A folder is therefore built beside its destination and renamed into place only
once every file is written and checked; a failed or killed export leaves nothing that looks
like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


@contextmanager
def staged_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside `out`; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(
            f"--out {str(out)!r} is a file; give a folder (new, empty, or with --overwrite)"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {str(out)!r} already holds files; give a new or empty folder, or pass --overwrite"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a model folder is an ordinary folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        previous = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        os.replace(out, previous / out.name)
        os.replace(staging, out)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staging, out)


def save_state_dict(
    state: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors refuses tensors that share memory (tied weights); each key gets its own copy."""
    seen: set[int] = set()
    tensors = {}
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        tensors[key] = tensor
    save_file(tensors, str(path), metadata=metadata)
    path.chmod(0o666 & ~_umask())  # safetensors creates its files private; an export is for sharing


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
