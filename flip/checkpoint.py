"""Load a trained FLIP model from whatever it was saved as, with nothing but the files.

`flip.load` takes three things:
- a Lightning checkpoint (`last.ckpt` from train.py): the towers are rebuilt from its saved
  hyperparameters;
- a safetensors export folder (`flip-export --format safetensors`): `model.safetensors` + the
  model config in `flip_config.json`. The preferred form to ship a model: weights only, no
  pickle, no optimizer state, memory-mapped on load;
- an open_clip folder (`flip-export --format open_clip`, or any folder open_clip loads as
  `local-dir:`): rebuilt by open_clip itself.
Nothing executes code from a file: checkpoints are unpickled with `weights_only=True`, through
`read_checkpoint`, which every FLIP loading path uses; its errors name the file and what was
expected, and never suggest turning the check off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from open_clip.constants import HF_CONFIG_NAME
from safetensors.torch import load_file

from flip.atomic import atomic_file, remove_stale_temporaries
from flip.models import FlipModel, build_model

MODEL_PREFIX = "model."
BIAS_KEY = "clip.logit_bias"  # FlipModel's logit bias, when it has one
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "flip_config.json"
FORMAT_NAME = "flip-safetensors"
FORMAT_VERSION = 1
OPEN_CLIP_CONFIG_NAME = HF_CONFIG_NAME  # "open_clip_config.json", what open_clip's local-dir: reads
OPEN_CLIP_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` that leaves the old file or the new one, never half of one (flip.atomic)."""
    started = time.time()
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)
    remove_stale_temporaries(path, started)


ACCEPTED = (
    "a Lightning checkpoint written by train.py (.ckpt), a safetensors export folder "
    f"({WEIGHTS_NAME} + {CONFIG_NAME}), or an open_clip folder ({OPEN_CLIP_CONFIG_NAME} + weights)"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: empty, truncated, a folder, or not a checkpoint at all."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint that pickles more than tensors and plain containers: refused, nothing of it runs."""


# bound at import: `flip.training.deepspeed.weights_only_loads` replaces `torch.load` for a while
_torch_load = torch.serialization.load
_REFUSED = re.compile(r"Unsupported global: GLOBAL (\S+)|Trying to (?:call|instantiate|set|build) [^.\n]*")


def read_checkpoint(
    path: str | os.PathLike,
    expected: str = ACCEPTED,
    map_location: Any = "cpu",
    allowed_globals: Iterable[Any] = (),
    mmap: bool | None = None,
) -> Any:
    """`torch.load(path, weights_only=True)`, with errors a user can act on.

    torch's own errors do not name the file (an empty file is a bare `EOFError`), and when the
    unpickler refuses an object its message suggests `weights_only=False`, i.e. running the file's
    code. `allowed_globals` adds plain classes to torch's list of types that may be rebuilt, for
    this load only (DeepSpeed's loss scaler, say); nothing else is ever unpickled.
    """
    name = str(path)
    if os.path.isdir(name):
        raise CheckpointError(f"{name!r} is a folder, not a checkpoint file; give {expected}")
    if not os.path.isfile(name):
        raise FileNotFoundError(f"no checkpoint at {name!r}; give {expected}")
    if os.path.getsize(name) == 0:
        raise CheckpointError(
            f"{name!r} is empty (0 bytes: a save or copy that never finished); give {expected}"
        )
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return _torch_load(name, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = _REFUSED.search(str(err))
        if refused is None:  # not a pickle at all (torch's "Unsupported operand"): a corrupt file
            raise CheckpointError(
                f"{name!r} is not a readable checkpoint (not a torch file); give {expected}"
            ) from None
        what = refused.group(1) or refused.group(0)
        raise UnsafeCheckpointError(
            f"{name!r} was refused: it pickles {what}, not only tensors and plain containers, and FLIP "
            f"never runs code from a file; give {expected}"
        ) from None
    except (EOFError, RuntimeError, KeyError, ValueError, UnicodeDecodeError, OSError) as err:
        detail = str(err).split(". ")[0].strip() or type(err).__name__
        raise CheckpointError(
            f"{name!r} is not a readable checkpoint (truncated, corrupt or another format: {detail}); "
            f"give {expected}"
        ) from None


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def weights_loaded_after() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... Model initialized randomly" meanwhile.

    open_clip logs it (on the root logger) for every model built without weights; where a
    checkpoint's weights replace the random ones right after, the line is false and alarming.
    """
    notice = _DropRandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> FlipModel:
    """Rebuild the model and load its weights (eval mode), from any of the three saved forms."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent  # the weights file of an export folder: the folder says how to build it
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            model = _load_safetensors_folder(path)
        elif (path / OPEN_CLIP_CONFIG_NAME).is_file():
            model = _load_open_clip_folder(path)
        elif (path / "latest").is_file():
            raise ValueError(
                f"{str(path)!r} is a DeepSpeed ZeRO checkpoint folder (per-rank shards); gather it into one "
                f"file first: flip-zero-to-fp32 {str(path)!r} model.ckpt, then load model.ckpt"
            )
        else:
            raise ValueError(
                f"{str(path)!r} holds neither {CONFIG_NAME} nor {OPEN_CLIP_CONFIG_NAME}; give {ACCEPTED}"
            )
    elif path.is_file():
        model = _load_lightning_checkpoint(path)
    else:
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}; give {ACCEPTED}")
    return model.to(device).eval()


def _load_lightning_checkpoint(path: Path) -> FlipModel:
    checkpoint = read_checkpoint(path)
    try:
        model_cfg = checkpoint["hyper_parameters"]["model"]
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{str(path)!r} is not a FLIP training checkpoint: it lacks hyper_parameters {err}; "
            f"give {ACCEPTED}"
        ) from None
    state = {
        key[len(MODEL_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    # the checkpoint holds the weights: never fetch them again
    model_cfg = {**model_cfg, "pretrained": None}
    if "init_logit_bias" not in model_cfg and BIAS_KEY in state:
        # saved while the temperature's init was a loss setting (loss.init_logit_bias): the weights
        # say whether the model has a bias parameter, and then overwrite the value it starts from
        model_cfg["init_logit_bias"] = float(state[BIAS_KEY].reshape(-1)[0])
    with weights_loaded_after():
        model = build_model(**model_cfg)
    model.load_state_dict(state)
    return model


def read_export_config(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("format") != FORMAT_NAME or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(folder / CONFIG_NAME)!r} has format {config.get('format')!r} version "
            f"{config.get('format_version')!r}; this FLIP reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    return config


def _load_safetensors_folder(folder: Path) -> FlipModel:
    config = read_export_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    with weights_loaded_after():
        model = build_model(**{**config["model"], "pretrained": None})
    model.load_state_dict(load_file(str(weights)))
    return model


def _load_open_clip_folder(folder: Path) -> FlipModel:
    # open_clip builds a folder without weights from random init, with only a log line: refuse instead
    if not any(p.suffix in OPEN_CLIP_WEIGHT_SUFFIXES for p in folder.iterdir()):
        raise FileNotFoundError(
            f"open_clip folder {str(folder)!r} has {OPEN_CLIP_CONFIG_NAME} but no weights "
            f"(*{', *'.join(OPEN_CLIP_WEIGHT_SUFFIXES)})"
        )
    return build_model(f"local-dir:{folder.resolve()}")
