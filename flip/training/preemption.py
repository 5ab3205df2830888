"""Preemption: SIGTERM, and Slurm's warning before the time limit, end a run with a checkpoint.

Schedulers (Slurm preemption and `scancel`, Kubernetes) send SIGTERM, then SIGKILL after a grace
period; `#SBATCH --signal=USR1@180` warns before the time limit. Lightning's own handling ends a
SIGTERM'd run with exit code 0 and nothing saved, and on SIGUSR1 writes `hpc_ckpt_N` from inside
the signal handler: on each rank at whatever point it has reached, and in every forked loader
worker too, which inherits the handler (one wrote a stale checkpoint and requeued the job).

Here the one mechanism for both signals is:
- the handler only sets a flag, and only in the process that installed it: a forked loader worker
  that receives the signal (Slurm signals every process of the step) ignores it from then on;
- at the next step boundary every rank all-reduces its flag, so all ranks stop after the same
  step even when the signal reached only one of them;
- all ranks write `last.ckpt` (weights, optimizer, schedule, loader position, every rank's RNG)
  through the checkpoint callback, atomically, as any other save;
- global rank 0 runs `scontrol requeue` when the signal was Slurm's requeue signal and Lightning's
  SLURM environment has auto-requeue on (its default);
- every process exits with 128 + the signal number, the code a shell reports for a process the
  signal killed, so nothing mistakes a preempted run for a finished one.

The next run resumes with `ckpt_path=auto` (see `flip.training.resume.resolve_ckpt_path`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is written; exits 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class _FlagOnlySignals(_SignalConnector):
    """Lightning's signal connector, with Lightning's handlers replaced by `Preemption`'s flag.

    Lightning's teardown still puts the handlers that were there before the run back.
    """

    def __init__(self, trainer: L.Trainer, preemption: Preemption) -> None:
        super().__init__(trainer)
        self.preemption = preemption

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False
        self._original_handlers = self._get_current_signal_handlers()
        self.preemption.owner_pid = os.getpid()
        for signum in self.preemption.signals(self.trainer):
            self._register_signal(signum, self.preemption.on_signal)


class Preemption(L.Callback):
    """Stops every rank at the same step on SIGTERM or Slurm's requeue signal; see the module doc."""

    def __init__(self) -> None:
        super().__init__()
        self.owner_pid: int | None = None
        self.received: set[int] = set()
        self._checked_step = -1

    def signals(self, trainer: L.Trainer) -> list[int]:
        environment = _slurm(trainer)
        if environment is None:
            return [signal.SIGTERM]
        return [signal.SIGTERM, int(environment.requeue_signal or signal.SIGUSR1)]

    def on_signal(self, signum: int, frame: Any) -> None:
        # runs between two bytecodes of the main thread: record only, act at the step boundary
        if os.getpid() != self.owner_pid:  # a forked loader worker: never saves, never requeues
            signal.signal(signum, signal.SIG_IGN)
            return
        self.received.add(int(signum))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before Trainer._run registers its handlers: ours are registered in their place
        if not isinstance(trainer._signal_connector, _FlagOnlySignals):
            trainer._signal_connector = _FlagOnlySignals(trainer, self)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._checked_step:  # accumulating: not a step boundary
            return
        self._checked_step = trainer.global_step
        agreed = self._agree(trainer)
        if agreed:
            self._stop(trainer, agreed)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a signal after the last step: save and stop here rather than start the evaluation
        agreed = self._agree(trainer)
        if agreed:
            self._stop(trainer, agreed)

    def _agree(self, trainer: L.Trainer) -> list[int]:
        """The signals any rank received, the same list on every rank."""
        candidates = self.signals(trainer)
        flags = torch.tensor([int(s in self.received) for s in candidates], dtype=torch.int32)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flags = flags.to(trainer.strategy.root_device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return [s for s, flag in zip(candidates, flags.tolist(), strict=True) if flag]

    def _stop(self, trainer: L.Trainer, agreed: list[int]) -> None:
        step = trainer.global_step
        requeue = [s for s in agreed if s != signal.SIGTERM]
        signum = signal.SIGTERM if signal.SIGTERM in agreed else requeue[0]
        log.warning(
            "rank %d: %s received (on this rank: %s); saving a resumable checkpoint at step %d",
            trainer.global_rank, " and ".join(signal.Signals(s).name for s in agreed),
            "yes" if self.received else "no, on another", step,
        )  # fmt: skip
        path = _save_last(trainer)
        environment = _slurm(trainer)
        if requeue and environment is not None and environment.auto_requeue and trainer.is_global_zero:
            _requeue_slurm_job()
        trainer.strategy.barrier("flip_preemption_saved")
        log.warning("rank %d: stopped at step %d, checkpoint %s", trainer.global_rank, step, path)
        raise Preempted(signum, step, path)


def _slurm(trainer: L.Trainer) -> SLURMEnvironment | None:
    environment = trainer._accelerator_connector.cluster_environment
    return environment if isinstance(environment, SLURMEnvironment) else None


def _save_last(trainer: L.Trainer) -> str:
    """`last.ckpt` through the checkpoint callback (its folder, atomic writes, DeepSpeed folders)."""
    from flip.training.checkpoint_io import ModelCheckpoint

    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.save_last:
        return callback.save_last_now(trainer)
    path = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
    trainer.save_checkpoint(path)
    return path


def _requeue_slurm_job() -> None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"SLURM job id {job!r} is not a number; not requeueing")
    result = subprocess.call(["scontrol", "requeue", job])
    if result == 0:
        log.warning("requeued Slurm job %s", job)
    else:
        log.error("scontrol requeue %s failed (exit code %d): the job will not restart", job, result)
