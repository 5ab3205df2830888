"""Export to FLIP's own form: the model's state dict in safetensors plus the config that builds it.

This is what `flip.load` prefers to a Lightning checkpoint: weights only (no optimizer state,
no pickle), loadable for every model FLIP can build, Hugging Face text towers included. The
config is the model's `config` (what `build_model` takes): a model named by an open_clip
architecture, `local-dir:` folder or `hf-hub:` id is rebuilt from that name, so the name must
still resolve where the export is loaded; the open_clip format copies the architecture instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flip.checkpoint import CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_NAME
from flip.config import __version__
from flip.export.files import save_state_dict, write_json
from flip.models import FlipModel


def write_safetensors_folder(model: FlipModel, folder: Path) -> dict[str, Any]:
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "flip_version": __version__,
        "model": {**model.config, "pretrained": None},
    }
    write_json(config, folder / CONFIG_NAME)
    save_state_dict(model.state_dict(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    return {"model": config["model"]}
