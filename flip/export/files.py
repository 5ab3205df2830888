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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


@contextmanager
def staged_folder(
    out: str | os.PathLike,
    overwrite: bool = False,
    not_replaceable: Callable[[Path], str | None] | None = None,
) -> Iterator[Path]:
    """Yield an empty folder beside `out`; on success it replaces `out`, on any failure it is removed.

    With `overwrite`, an existing non-empty `out` is replaced only if `not_replaceable(out)` finds
    nothing wrong with it (the caller recognises its own previous output); it is checked again
    just before the swap, since an export can take minutes. A failed final rename puts the
    previous folder back. Only a killed process (which runs no cleanup) can leave the hidden
    `.NAME.*.tmp` folder behind.
    """
    target = Path(os.path.abspath(out))
    _check_destination(out, target, overwrite, not_replaceable)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a model folder is an ordinary folder
        yield staging
        _check_destination(out, target, overwrite, not_replaceable)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone once renamed into place


def _check_destination(
    out: str | os.PathLike,
    target: Path,
    overwrite: bool,
    not_replaceable: Callable[[Path], str | None] | None,
) -> None:
    here = Path.cwd().resolve()
    resolved = target.resolve()
    if resolved == here or resolved in here.parents:
        raise FileExistsError(
            f"--out {str(out)!r} is {'the' if resolved == here else 'a folder holding the'} current folder; "
            "an export replaces its folder as a whole, so give a new folder for it, e.g. --out exports/NAME"
        )
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(
            f"--out {str(out)!r} is a file or a link; give a folder (new, or a previous export)"
        )
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"--out {str(out)!r} already holds files; give a new or empty folder, or pass --overwrite "
            "to replace a previous export"
        )
    reason = "nothing identifies it" if not_replaceable is None else not_replaceable(target)
    if reason is not None:
        raise FileExistsError(
            f"--out {str(out)!r} is not a previous export, so --overwrite leaves it alone: {reason}. Give a "
            "new or empty folder, or remove those entries yourself"
        )


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` onto `target`; a previous `target` is retired first and restored on failure."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    try:
        os.replace(target, retired / target.name)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(retired / target.name, target)
            raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


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
