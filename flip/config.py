"""What every layer needs from the configuration: where conf/ is, the OmegaConf resolvers the
YAML files use (registered on `import flip`), configs as plain Python containers, and the keys
that moved (an old key in a user's script fails naming the new one)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "CONFIG_PATH",
    "EVAL_SCRIPT_MOVED_KEYS",
    "MOVED_KEYS",
    "__version__",
    "check_moved_keys",
    "check_moved_keys_in",
    "cpu_precision",
    "log_rank_suffix",
    "num_nodes",
    "override_key",
    "plain",
    "register_resolvers",
]

__version__ = "0.1.0"

# conf/ lives beside the package in a checkout (editable install); an absolute path lets Hydra
# find it whether an entry point runs from a script (train.py, eval/*.py) or a console script.
CONFIG_PATH = str(Path(__file__).resolve().parents[1] / "conf")

# config keys that moved, and where to: users' scripts may still set the old ones
# (train.py's); a key stands for the node under it too, and a new key written `~key` means the
# old on/off switch became that node's presence
MOVED_KEYS = {
    # the model owns its temperature, so that a checkpoint rebuilds it from the model config alone
    "loss.init_logit_scale": "model.init_logit_scale",
    "loss.init_logit_bias": "model.init_logit_bias",
    # evaluation is a benchmark + protocols (conf/benchmark, conf/protocol): the FaceShapes
    # benchmark was merged into `eval` and the probe had a node of its own; eval.split,
    # eval.batch_size, eval.num_workers, eval.test_shards and eval.during_training.* stay
    "eval.linear_probe.enabled": "~eval.protocols.linear_probe",
    "eval.linear_probe": "eval.protocols.linear_probe",
    "eval.train_split": "eval.protocols.linear_probe.train_split",
    "eval.val_split": "eval.protocols.linear_probe.val_split",
    **{
        f"eval.{key}": f"eval.benchmark.{key}"
        for key in ("root", "name", "reader", "test_split", "templates", "binary", "multiclass", "classes")
    },
}
# eval/linear_probe.py's: the probe's settings were `probe.*` and four top-level keys
EVAL_SCRIPT_MOVED_KEYS = {
    "probe": "protocols.linear_probe",
    **{key: f"protocols.linear_probe.{key}" for key in ("train_split", "val_split", "max_train", "max_val")},
}
_ABSENT = object()


def check_moved_keys(keys: Iterable[str], moved: Mapping[str, str] = MOVED_KEYS) -> None:
    """Fail on any of `keys` (dotted, as in `loss.init_logit_scale`) in `moved`, or under a node
    there, naming the key that replaced it.

    Hydra refuses a moved key on the command line by itself, but as one "not in struct", which does
    not say where the setting went (and with `+` it would add it where nothing reads it).
    """
    found = []
    for key in keys:
        old = next(
            (o for o in sorted(moved, key=len, reverse=True) if key == o or key.startswith(o + ".")), None
        )
        if old is None:
            continue
        new = moved[old]
        found.append(
            f"{key} is gone: {new} turns it off"
            if new.startswith("~")
            else f"{key} is now {new}{key[len(old) :]}"
        )
    if found:
        raise ValueError(f"moved config key(s): {'; '.join(found)}; set the new key(s) instead")


def check_moved_keys_in(cfg: DictConfig, moved: Mapping[str, str] = MOVED_KEYS) -> None:
    """`check_moved_keys` on the keys of `moved` that a composed config holds (set in a config
    file, e.g. an experiment, where the command-line check cannot see them)."""
    check_moved_keys(
        [key for key in moved if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT], moved
    )


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
