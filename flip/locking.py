"""One process at a time per folder: an advisory lock file that names its holder.

Two writers of one folder (two `flip-data` runs on one `--output`, two ranks generating the
same FaceShapes root) would delete each other's temporary files and interleave shards. The
kernel releases an `flock` when its holder dies, even by SIGKILL, so a killed run never
leaves a stale lock behind. The holder writes its pid, host and start time into the lock
file, so whoever is refused can be told who holds it. The standard library only, like
`flip.atomic`, so light entry points can use it without importing torch.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

__all__ = ["FolderBusyError", "hold_lock"]


class FolderBusyError(RuntimeError):
    """Another process holds the lock; the message names it (pid, host, since when)."""


def _holder(handle) -> str:
    handle.seek(0)
    text = handle.read().strip()
    return text or "another process (it has not written its pid yet)"


@contextlib.contextmanager
def hold_lock(lock_file: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Holds an exclusive lock on `lock_file` (created if needed) for the `with` block.

    `wait=False` refuses at once with FolderBusyError naming the holder; `wait=True` queues
    behind it (for cooperating processes that should take turns, not fail). Without fcntl
    (not POSIX) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock_file, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise FolderBusyError(
                f"{what} is in use by {_holder(handle)} (lock file {str(lock_file)!r}); wait for that run "
                "to finish or stop it, or choose another folder"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {started}\n")
            handle.flush()
            yield
        finally:
            with contextlib.suppress(OSError):
                handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
