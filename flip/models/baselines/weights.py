"""Reading released weight files without running their code, and checking them against a model.

Released checkpoints are pickles (`.pth`) or safetensors. A pickle is read with
`torch.load(weights_only=True)`: tensors and plain containers only, nothing of it executes.
Key checks name what is missing and what is unexpected, so a wrong or truncated file fails with
the names of the tensors it lacks instead of a model that silently keeps random weights.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)

# where training scripts nest the weights inside a saved dict (FaRL: state_dict, BLIP/FLIP: model)
NESTING_KEYS = ("state_dict", "model", "module")
# prefixes that data-parallel wrappers add to every key
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN = 8


class WeightsError(ValueError):
    """A weights file that does not hold the model it was given as: the message names the keys."""


def read_weights(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The top-level mapping of a `.pth`/`.bin`/`.pt` pickle or a `.safetensors` file."""
    name = str(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"no {what} at {name!r}")
    if os.path.getsize(name) == 0:
        raise WeightsError(
            f"{name!r} is empty (0 bytes: a download or copy that never finished); give {what}"
        )
    if Path(name).suffix == ".safetensors":
        return dict(load_file(name))
    try:
        raw = torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"{name!r} was refused: it pickles more than tensors and plain containers "
            f"({str(err).splitlines()[0][:200]}), and FLIP never runs code from a file; give {what}"
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError) as err:
        raise WeightsError(
            f"{name!r} is not a readable checkpoint (truncated, corrupt or another format: "
            f"{str(err).splitlines()[0][:200]}); give {what}"
        ) from None
    if not isinstance(raw, Mapping):
        raise WeightsError(f"{name!r} holds a {type(raw).__name__}, not a mapping of tensors; give {what}")
    return dict(raw)


def state_dict_of(raw: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: unnested from `state_dict`/`model`, wrapper prefixes removed."""
    for key in NESTING_KEYS:
        inner = raw.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            raw = inner
            break
    state = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    for prefix in WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:SHOWN])
    return f"{shown} (and {len(keys) - SHOWN} more)" if len(keys) > SHOWN else shown


def check_keys(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    given: Mapping[str, torch.Tensor],
    source: str,
    what: str,
    unexpected_ok: bool = True,
    name: Callable[[str], str] = str,
) -> list[str]:
    """Fail naming missing, misshapen (and, unless `unexpected_ok`, unexpected) keys.

    `name` gives the file's name of a key when the loader renamed the file's tensors. Returns the
    unexpected keys, which the caller reports as ignored.
    """
    missing = [name(k) for k in expected if k not in given]
    misshapen = [
        f"{name(k)} {tuple(given[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k])
    ]
    unexpected = sorted(name(k) for k in given if k not in expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if misshapen:
        problems.append(f"{len(misshapen)} of another shape: {_listing(misshapen)}")
    if unexpected and (problems or not unexpected_ok):
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if problems:
        raise WeightsError(f"{source!r} is not {what}: " + "; ".join(problems))
    return unexpected


def report_ignored(source: str, ignored: list[str]) -> list[str]:
    if ignored:
        log.warning(
            "%s: ignored %d tensor(s) the embeddings do not use: %s", source, len(ignored), _listing(ignored)
        )
    return ignored
