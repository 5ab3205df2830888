"""OmegaConf resolvers that the Hydra configs in conf/ use; registered on `import flip`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["CONFIG_PATH", "__version__", "cpu_precision", "log_rank_suffix", "register_resolvers"]

__version__ = "0.1.0"

# conf/ lives beside the package in a checkout (editable install); an absolute path lets Hydra
# find it whether an entry point runs from a script (train.py, eval/*.py) or a console script.
CONFIG_PATH = str(Path(__file__).resolve().parents[1] / "conf")


def cpu_precision() -> str:
    """Lightning precision for CPU training: "bf16-mixed" where the CPU multiplies bf16 natively.

    With AVX512-BF16 or AMX, bf16 autocast runs the towers' matmuls about 2x faster than
    float32 (0.18 vs 0.43 s per demo step on 2 Zen 5 cores); without them oneDNN emulates
    bf16 and it is slower than float32, so those CPUs stay on "32-true". Losses run in float32
    either way (see flip.losses.combined).
    """
    import torch  # here, not at module level: `import flip` stays light

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if native else "32-true"


def log_rank_suffix(environ: Mapping[str, str] | None = None) -> str:
    """ "" for the first process of a run, ".rank<N>" (".node<N>.rank<L>") for the others.

    Every process of a multi-process run configures Hydra's logging, with the same run folder:
    without a suffix they all append to one train.log, their lines interleaved. The rank comes
    from the launcher, since logging starts before Lightning knows it: torchrun's RANK, srun's
    SLURM_PROCID (when srun started more than one task), or the LOCAL_RANK and NODE_RANK that
    Lightning gives the processes it starts.
    """
    env = os.environ if environ is None else environ
    if env.get("RANK"):
        rank = int(env["RANK"])
        return f".rank{rank}" if rank else ""
    if env.get("SLURM_PROCID") and int(env.get("SLURM_NTASKS") or 1) > 1:
        rank = int(env["SLURM_PROCID"])
        return f".rank{rank}" if rank else ""
    node = int(env.get("NODE_RANK") or env.get("GROUP_RANK") or 0)
    local = int(env.get("LOCAL_RANK") or 0)
    if node:
        return f".node{node}.rank{local}"
    return f".rank{local}" if local else ""


def register_resolvers() -> None:
    """`${cpu_precision:}` and `${log_rank_suffix:}` in a config resolve to the functions of
    those names; safe to call twice."""
    OmegaConf.register_new_resolver("cpu_precision", cpu_precision, replace=True)
    OmegaConf.register_new_resolver("log_rank_suffix", log_rank_suffix, replace=True)
