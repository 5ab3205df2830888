"""Files that are either whole or absent: written beside the target, then renamed onto it.

Renaming within a folder is atomic on POSIX, so a reader (a resuming run, `flip-data`'s
resume, evaluation) finds the old file or the new one, never half of one. The standard
library only, so light entry points (`flip-data`) can use it without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["TEMP_SUFFIX", "atomic_file", "atomic_write_text", "remove_stale_temporaries", "write_json_atomic"]

# temporaries are `.NAME.<random>.tmp` beside NAME: hidden, and never matched by `*.tar`/`*.ckpt`
TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """An open temp file beside `path`, flushed to disk and renamed onto it on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: str | os.PathLike, before: float) -> None:
    """A process killed mid-write (SIGKILL runs no cleanup) leaves its temp file behind; the
    next successful write of the same target removes those last written before it started."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < before:
                stale.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "wb") as f:
        f.write(text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Pretty, sorted JSON: a killed run never leaves half a file that looks finished."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
