"""What every layer needs from the configuration: where conf/ is, the OmegaConf resolvers the
YAML files use (registered on `import flip`), configs as plain Python containers, and the
translation of renamed keys (old keys in users' scripts keep working or fail naming the new one)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "CONFIG_PATH",
    "MOVED_KEYS",
    "__version__",
    "check_moved_keys",
    "cpu_precision",
    "log_rank_suffix",
    "num_nodes",
    "override_key",
    "plain",
    "register_resolvers",
    "reject_renamed_keys",
    "rename_overrides",
]

__version__ = "0.1.0"

# conf/ lives beside the package in a checkout (editable install); an absolute path lets Hydra
# find it whether an entry point runs from a script (train.py, eval/*.py) or a console script.
CONFIG_PATH = str(Path(__file__).resolve().parents[1] / "conf")

# config keys that moved, and where to: users' scripts may still set the old ones
MOVED_KEYS = {
    # the model owns its temperature, so that a checkpoint rebuilds it from the model config alone
    "loss.init_logit_scale": "model.init_logit_scale",
    "loss.init_logit_bias": "model.init_logit_bias",
}


def check_moved_keys(keys: Iterable[str]) -> None:
    """Fail on any of `keys` (dotted, as in `loss.init_logit_scale`) in MOVED_KEYS, naming the key
    that replaced it.

    Hydra refuses a moved key on the command line by itself, but as one "not in struct", which does
    not say where the setting went (and with `+` it would add it where nothing reads it).
    """
    moved = [f"{key} is now {MOVED_KEYS[key]}" for key in keys if key in MOVED_KEYS]
    if moved:
        raise ValueError(f"moved config key(s): {'; '.join(moved)}; set the new key(s) instead")


def override_key(override: str) -> str:
    """The dotted key of a Hydra command-line override (`+loss.x=1`, `~loss.x`, `loss.x=1,2`)."""
    return override.lstrip("~+").split("=", 1)[0]


def cpu_precision() -> str:
    """Lightning precision for CPU training: "bf16-mixed" where the CPU multiplies bf16 natively.

    With AVX512-BF16 or AMX, bf16 autocast runs the towers' matmuls faster than float32
    (step times: docs/training.md, "The demo recipe"); without them oneDNN emulates bf16 and
    it is slower than float32, so those CPUs stay on "32-true". Losses run in float32 either
    way (see flip.losses.combined).
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


def plain(cfg: Any) -> Any:
    """`cfg` with interpolations resolved, as dicts and lists (what hparams, JSON and code that
    knows nothing of OmegaConf want); anything else is returned as it is."""
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def register_resolvers() -> None:
    """`${cpu_precision:}`, `${log_rank_suffix:}` and `${flip.num_nodes:}` in a config resolve
    to the functions of those names; safe to call twice (Hydra's multirun trains in one process).

    Lightning detects SLURM and torchrun by itself and takes ranks from them, but it must be
    told the number of nodes; `${flip.num_nodes:}` in conf/trainer/multinode.yaml reads it from
    the launcher's environment, so a job script never has to repeat it.
    """
    OmegaConf.register_new_resolver("cpu_precision", cpu_precision, replace=True)
    OmegaConf.register_new_resolver("log_rank_suffix", log_rank_suffix, replace=True)
    OmegaConf.register_new_resolver("flip.num_nodes", num_nodes, replace=True)


_ABSENT = object()


def _renamed(key: str, renamed: Mapping[str, str]) -> tuple[str, str] | None:
    """(old prefix, new prefix) of the longest renamed prefix of `key` (at a dot), if any."""
    for old in sorted(renamed, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return old, renamed[old]
    return None


def rename_overrides(args: list[str], renamed: Mapping[str, str]) -> list[str]:
    """Command-line overrides with renamed keys given their new names, each change logged.

    `renamed` maps an old key (or node) to its new one; a new key written `~key` marks an old
    on/off switch (`old=false` removes the node, `old=true` was the default and is dropped).
    Flags, group choices (`group@package=option`) and values are left as they are.
    """
    out = []
    for arg in args:
        sign = arg[: len(arg) - len(arg.lstrip("+~"))]
        key, eq, value = arg[len(sign) :].partition("=")
        found = None if arg.startswith("-") or "@" in key else _renamed(key, renamed)
        if found is None:
            out.append(arg)
            continue
        old, new = found
        if new.startswith("~"):  # an on/off switch became the presence of a node
            replacement = [new] if value.strip().lower() in ("false", "0", "null") else []
        else:
            replacement = [f"{sign}{new}{key[len(old) :]}{eq}{value}"]
        now = f"is now {replacement[0]}" if replacement else "is what runs by default; dropped"
        logging.getLogger(__name__).warning("%s %s (a renamed key: use the new one)", arg, now)
        out += replacement
    return out


def reject_renamed_keys(cfg: DictConfig, renamed: Mapping[str, str]) -> None:
    """Fail, naming the new keys, when a config (e.g. a user's experiment file) sets renamed ones."""
    found = [old for old in renamed if OmegaConf.select(cfg, old, default=_ABSENT) is not _ABSENT]
    if found:
        moved = "; ".join(
            f"{old} -> remove the node ({renamed[old][1:]}: null)"
            if renamed[old].startswith("~")
            else f"{old} -> {renamed[old]}"
            for old in found
        )
        raise ValueError(f"config keys that were renamed: {moved}")
