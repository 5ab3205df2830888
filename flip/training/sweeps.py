"""Hydra sweeps (`python train.py -m ...`) and the processes Lightning starts for DDP.

For a multi-process strategy started from one process, Lightning launches each other rank by
running the same command line again (its subprocess launcher), `-m` and all: every child
would run the whole sweep on its own, so the ranks of one job train different jobs, and the
sweep runs once per GPU (Lightning issue 11300). Such a run is refused before any process is
started. When torchrun or srun starts the processes, Lightning starts none, and each
launch is one run; a sweep is then one launch per job (a loop, or a SLURM job array).
"""

from __future__ import annotations

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher


def check_sweep_launch(trainer: L.Trainer) -> None:
    """Raise when a Hydra multirun job would make Lightning re-run the command for its ranks."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher = trainer.strategy.launcher
    if not isinstance(launcher, _SubprocessScriptLauncher) or launcher.num_processes < 2:
        return
    if launcher.cluster_environment.creates_processes_externally:
        return  # torchrun / srun started the ranks: nothing is re-run
    raise ValueError(
        f"a Hydra multirun (-m) with {type(trainer.strategy).__name__} over {launcher.num_processes} "
        "processes per node that Lightning would start itself: Lightning starts the other ranks by "
        "running this command line again, so each of them would run the whole sweep. Run each job of "
        "the sweep as its own launch (without -m, e.g. in a shell loop or a SLURM job array), with "
        "torchrun or srun starting the processes, or sweep with trainer.devices=1"
    )
