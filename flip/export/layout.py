"""What an export folder holds, so that `--overwrite` can tell a previous export from anything else.

`--overwrite` replaces a folder as a whole. It must never remove what flip-export did not
write: a folder counts as a previous export only when it holds one export config file that
says so and, besides it, nothing but the files that format writes. Anything else (a notes
file, a subfolder, a second config) is named and the folder is left alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flip.checkpoint import CONFIG_NAME as FLIP_CONFIG_NAME
from flip.checkpoint import FORMAT_NAME as FLIP_FORMAT_NAME
from flip.checkpoint import WEIGHTS_NAME as FLIP_WEIGHTS_NAME
from flip.export import onnx_format, open_clip_format

# what a Hugging Face tokenizer's save_pretrained may write (open_clip and onnx exports of HF towers)
TOKENIZER_FILES = frozenset(
    {
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)


@dataclass(frozen=True)
class Layout:
    format: str
    config: str
    files: frozenset[str]  # every name an export of this format may hold, its config included

    def is_its_config(self, text: str) -> bool:
        """The config file's content, not only its name, identifies the export."""
        try:
            data = json.loads(text)
        except ValueError:
            return False
        if not isinstance(data, dict):
            return False
        if self.format == "open_clip":
            return isinstance(data.get("model_cfg"), dict)
        expected = {"safetensors": FLIP_FORMAT_NAME, "onnx": onnx_format.FORMAT_NAME}[self.format]
        return data.get("format") == expected


LAYOUTS = (
    Layout("safetensors", FLIP_CONFIG_NAME, frozenset({FLIP_CONFIG_NAME, FLIP_WEIGHTS_NAME})),
    Layout(
        "open_clip",
        open_clip_format.CONFIG_NAME,
        frozenset({open_clip_format.CONFIG_NAME, open_clip_format.WEIGHTS_NAME}) | TOKENIZER_FILES,
    ),
    Layout(
        "onnx",
        onnx_format.CONFIG_NAME,
        frozenset(
            {
                onnx_format.CONFIG_NAME,
                onnx_format.IMAGE_NAME,
                onnx_format.TEXT_NAME,
                # torch moves weights into a side file once a graph passes 2 GB
                f"{onnx_format.IMAGE_NAME}.data",
                f"{onnx_format.TEXT_NAME}.data",
            }
        )
        | TOKENIZER_FILES,
    ),
)


def _entry_name(path: Path) -> str:
    return f"{path.name}/" if path.is_dir() and not path.is_symlink() else path.name


def not_an_export(folder: Path) -> str | None:
    """None when `folder` is a previous export; else why not, naming the unexpected entries."""
    entries = sorted(folder.iterdir())
    configs = [
        layout
        for layout in LAYOUTS
        if (folder / layout.config).is_file() and not (folder / layout.config).is_symlink()
    ]
    known = ", ".join(f"{layout.config} ({layout.format})" for layout in LAYOUTS)
    if len(configs) != 1:
        what = "no export config" if not configs else f"{len(configs)} export configs"
        names = [_entry_name(p) for p in entries]
        return f"it holds {what} ({known}) and {_listing(names)}"
    layout = configs[0]
    if not layout.is_its_config((folder / layout.config).read_text(errors="replace")):
        return f"its {layout.config} is not the config a {layout.format} export writes"
    unexpected = [
        _entry_name(p) for p in entries if p.name not in layout.files or p.is_symlink() or not p.is_file()
    ]
    if unexpected:
        return f"besides its {layout.config} ({layout.format} export) it holds {_listing(unexpected)}"
    return None


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
