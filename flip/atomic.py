"""Files that are either whole or absent: written beside the target, then renamed onto it.

Renaming within a folder is atomic on POSIX, so a reader (a resuming run, `flip-data`'s
resume, evaluation) finds the old file or the new one, never half of one. The standard
library only, so light entry points (`flip-data`) can use it without importing torch.

`tempfile.mkstemp` creates its file 0600 whatever the umask; the renamed file gets the mode a
plain `open(path, "w")` would have given it instead (the old file's mode, or 0666 less the
umask), so shards and checkpoints on a shared cluster folder are as readable as anything else.
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
        os.fchmod(fd, _mode_of_a_plain_open(path))
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_of_a_plain_open(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777  # open() keeps the mode of a file it truncates
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask can only set it,
    and setting it for a moment would leave other threads' files 0666 meanwhile)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
