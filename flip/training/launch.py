"""What the launcher (SLURM, torchrun) already knows, for the Hydra config to read.

Lightning detects SLURM and torchrun by itself and takes ranks from them, but it must be told
the number of nodes; `${flip.num_nodes:}` in `conf/trainer/multinode.yaml` reads it from the
launcher's environment, so a job script never has to repeat it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from omegaconf import OmegaConf


def num_nodes(environ: Mapping[str, str] | None = None) -> int:
    """SLURM_NNODES under SLURM, WORLD_SIZE / LOCAL_WORLD_SIZE under torchrun, else 1."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_NNODES"):
        return int(env["SLURM_NNODES"])
    if env.get("WORLD_SIZE") and env.get("LOCAL_WORLD_SIZE"):
        world, local = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        if world % local:
            raise ValueError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}")
        return world // local
    return 1


def register_resolvers() -> None:
    """Idempotent: Hydra's multirun calls the training function once per job in one process."""
    if not OmegaConf.has_resolver("flip.num_nodes"):
        OmegaConf.register_new_resolver("flip.num_nodes", num_nodes)
