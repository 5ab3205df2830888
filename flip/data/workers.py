"""Worker processes for the shard writers (FaceShapes, `flip-data`) that die with their parent and
whose death ends the run.

`concurrent.futures.ProcessPoolExecutor` and `multiprocessing.Pool` fit neither failure a data
job meets: workers outlive a parent killed with SIGKILL (re-parented, still holding memory and
writing), and a worker killed mid-task (the kernel's OOM killer) can leave the parent waiting
forever on the shared queues, whose locks the dead worker held. Here every worker has its own pipe, so
nothing is shared that a death could leave locked, and the parent waits on the pipes and
the processes' sentinels together: a dead worker is seen at once and ends the run with
`WorkerDied`. Each worker asks the kernel to kill it when its parent dies
(`PR_SET_PDEATHSIG` on Linux) and, wherever that is missing, watches its parent's pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any, Generic, TypeVar

__all__ = ["WorkerDied", "WorkerPool", "die_with_parent"]

T = TypeVar("T")
R = TypeVar("R")

_PR_SET_PDEATHSIG = 1
_WATCH_SECONDS = 1.0
_JOIN_SECONDS = 5.0


class WorkerDied(RuntimeError):
    """A worker process ended without answering; the message says which, how and what to do."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def die_with_parent(parent: int) -> None:
    """Makes this process die when `parent` does: the kernel's parent-death signal on Linux, and a
    thread that polls the parent's pid as the fallback (other systems, or a parent that died
    before the signal was armed)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(_WATCH_SECONDS)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="flip-parent-watch", daemon=True).start()


def _serve(function: Callable[[Any], Any], conn: Connection, parent: int) -> None:
    """A worker's life: answer each task on its own pipe until told to stop (None)."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        try:
            answer = ("ok", function(task))
        except BaseException as exc:  # sent back and raised in the parent, with this traceback
            answer = ("error", exc, traceback.format_exc())
        try:
            conn.send(answer)
        except Exception as exc:  # e.g. an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), traceback.format_exc()))


class WorkerPool(Generic[T, R]):
    """`workers` processes applying `function` to tasks; see `imap_unordered`.

    Use as a context manager: leaving it stops the workers (and kills any that do not stop).
    """

    def __init__(self, function: Callable[[T], R], workers: int, describe: Callable[[T], str] = str) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers}; accepted: >= 1")
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(method)  # fork: workers start at once and share the parent's imports
        self.describe = describe
        self._workers: list[tuple[Any, Connection]] = []
        parent = os.getpid()
        try:
            for _ in range(workers):
                mine, theirs = context.Pipe(duplex=True)
                process = context.Process(target=_serve, args=(function, theirs, parent), daemon=True)
                process.start()
                theirs.close()
                self._workers.append((process, mine))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WorkerPool[T, R]:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(kill=kind is not None)  # failing: the others' work is lost anyway, stop them now

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self._workers]

    def imap_unordered(self, tasks: Iterable[T]) -> Iterator[tuple[T, R]]:
        """(task, result) as each finishes; at most one task per worker is in flight, so `tasks`
        is consumed lazily. Raises WorkerDied as soon as a worker dies, and re-raises a task's
        exception."""
        idle = list(range(len(self._workers)))
        busy: dict[int, T] = {}
        source = iter(tasks)
        exhausted = False
        while True:
            while idle and not exhausted:
                task = next(source, _END)
                if task is _END:
                    exhausted = True
                    break
                index = idle.pop()
                self._send(index, task)
                busy[index] = task
            if not busy:
                return
            for index in self._ready(busy):
                task = busy.pop(index)
                idle.append(index)
                yield task, self._receive(index, task)

    def _send(self, index: int, task: T) -> None:
        try:
            self._workers[index][1].send(task)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise self._died(index, task) from None

    def _ready(self, busy: dict[int, T]) -> list[int]:
        """Busy workers with an answer waiting; WorkerDied if any worker has died."""
        conns = {self._workers[i][1]: i for i in busy}
        sentinels = {process.sentinel: i for i, (process, _) in enumerate(self._workers)}
        ready = wait([*conns, *sentinels])
        answered = [conns[c] for c in ready if c in conns]
        for sentinel in (s for s in ready if s in sentinels):
            index = sentinels[sentinel]
            if index not in answered:  # an answer sent just before exiting is still read
                raise self._died(index, busy.get(index))
        return answered

    def _receive(self, index: int, task: T) -> R:
        try:
            answer = self._workers[index][1].recv()
        except (EOFError, OSError):
            raise self._died(index, task) from None
        if answer[0] == "ok":
            return answer[1]
        _, exc, remote = answer
        if hasattr(exc, "add_note"):
            exc.add_note(f"in worker process {self._workers[index][0].pid}:\n{remote}")
        raise exc

    def _died(self, index: int, task: T | None) -> WorkerDied:
        process = self._workers[index][0]
        process.join(timeout=_JOIN_SECONDS)
        doing = f" while working on {self.describe(task)}" if task is not None else ""
        hint = (
            " (SIGKILL is what the kernel's out-of-memory killer sends: fewer --workers need less memory)"
            if process.exitcode == -signal.SIGKILL
            else ""
        )
        return WorkerDied(f"worker process {process.pid} {_describe_exit(process.exitcode)}{doing}{hint}")

    def close(self, kill: bool = False) -> None:
        """Asks every worker to stop (or, with `kill`, kills them), and kills those still alive
        after a few seconds."""
        for process, conn in self._workers:
            with contextlib.suppress(OSError, ValueError):
                if kill:
                    process.kill()
                elif process.is_alive():
                    conn.send(None)
        deadline = time.monotonic() + _JOIN_SECONDS
        for process, conn in self._workers:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=_JOIN_SECONDS)
            conn.close()
        self._workers = []


_END = object()
