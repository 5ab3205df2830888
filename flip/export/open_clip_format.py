"""Export to open_clip's folder format, loaded with `create_model_and_transforms('local-dir:DIR')`.

open_clip 3.x reads from such a folder `open_clip_config.json` = {"model_cfg": the architecture,
"preprocess_cfg": the image transform settings} and the first weights file in its order of
preference (`open_clip_model.safetensors` first). Its tokenizer follows `model_cfg.text_cfg`:
open_clip's own CLIP BPE tokenizer (shipped in the package), or, when `hf_tokenizer_name` is
set, a Hugging Face tokenizer read from the folder itself. This is the layout open_clip's own
`push_to_hf_hub` writes, so the folder can also be uploaded and used as `hf-hub:ORG/NAME`.

What cannot be exported this way: a Hugging Face transformers text tower (`text_cfg` with
`hf_model_name`, e.g. a BERT). open_clip builds that tower from
`transformers.AutoConfig.from_pretrained(hf_model_name)`, i.e. from the Hugging Face hub (or a
path on the exporting machine), never from the folder: the export would not load offline or
elsewhere. Such models export to `safetensors` (for `flip.load`) and `onnx`.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from PIL import Image

from flip.export.files import save_state_dict, write_json
from flip.models import FlipModel

CONFIG_NAME = HF_CONFIG_NAME  # open_clip_config.json
WEIGHTS_NAME = HF_SAFE_WEIGHTS_NAME  # open_clip_model.safetensors
OPEN_CLIP_MODEL_CLASSES = (open_clip.CLIP, open_clip.CustomTextCLIP, open_clip.CoCa)
# captions that exercise cleaning, case, accents, punctuation, the empty string and truncation
PROBE_TEXTS = (
    "a photo of a face",
    "A smiling WOMAN with long, blond hair — and eyeglasses!",
    "",
    "ÉTÉ: un homme âgé, barbu, au café " * 8,
)


log = logging.getLogger(__name__)


class OpenClipExportError(ValueError):
    """The model cannot be written as a folder that open_clip loads unchanged; the message says why."""


def open_clip_model_config(model: FlipModel) -> dict[str, Any]:
    """The open_clip `model_cfg` that builds exactly these towers (parameter names and shapes).

    A custom FLIP architecture is its `arch`; a named one is open_clip's own config for the name
    (built-in, `local-dir:` or `hf-hub:`). The logit scale/bias initialisation FLIP passes to
    open_clip as constructor arguments goes into the config: a `logit_bias` parameter exists
    only when `init_logit_bias` is set (SigLIP), and the weights then overwrite both values.
    """
    config = model.config
    if config.get("arch") is not None:
        model_cfg = copy.deepcopy(dict(config["arch"]))
    else:
        model_cfg = open_clip.get_model_config(config["name"])
        if model_cfg is None:
            raise OpenClipExportError(
                f"open_clip has no architecture config for model.name {config['name']!r}"
            )
    if config.get("image_size") is not None:  # a tower re-sized for fine-tuning (build_model's image_size)
        model_cfg["vision_cfg"] = {**model_cfg["vision_cfg"], "image_size": int(config["image_size"])}
    for key in ("init_logit_scale", "init_logit_bias"):
        if config.get(key) is not None:
            model_cfg[key] = float(config[key])
    if model.logit_bias is not None and model_cfg.get("init_logit_bias") is None:
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach().reshape(-1)[0])
    if isinstance(model.clip, open_clip.CustomTextCLIP) and "multimodal_cfg" not in model_cfg:
        model_cfg["custom_text"] = True
    return json.loads(json.dumps(model_cfg))  # plain JSON types, no shared references


def check_open_clip_exportable(model: FlipModel, model_cfg: dict[str, Any]) -> None:
    """Raise OpenClipExportError naming what open_clip could not rebuild from the folder alone."""
    if not isinstance(model.clip, OPEN_CLIP_MODEL_CLASSES):
        raise OpenClipExportError(
            f"model {model.config.get('name')!r} is a {type(model.clip).__name__}, not one of open_clip's "
            f"model classes ({', '.join(c.__name__ for c in OPEN_CLIP_MODEL_CLASSES)}); "
            "export it with --format safetensors or onnx"
        )
    if model.config.get("image_stem") is not None:
        raise OpenClipExportError(
            f"model {model.config.get('name')!r} has a convolutional image stem (model.image_stem="
            f"{model.config['image_stem']!r}, flip.models.image_stem), which open_clip's ViT cannot build; "
            "export it with --format safetensors (flip.load) or onnx"
        )
    hf_model = model_cfg.get("text_cfg", {}).get("hf_model_name")
    if hf_model:
        raise OpenClipExportError(
            f"model {model.config.get('name')!r} has a Hugging Face text tower (text_cfg.hf_model_name="
            f"{hf_model!r}); open_clip builds that tower with transformers.AutoConfig.from_pretrained"
            f"({hf_model!r}), from the Hugging Face hub or that path, not from the exported folder, so the "
            "folder would not load on its own. Export it with --format safetensors (flip.load) or onnx"
        )
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name") and not hasattr(
        model.tokenizer, "save_pretrained"
    ):
        raise OpenClipExportError(
            f"model {model.config.get('name')!r} names a Hugging Face tokenizer but its tokenizer "
            f"({type(model.tokenizer).__name__}) cannot save its files into the folder"
        )


def preprocess_config(model: FlipModel) -> dict[str, Any]:
    """The image transform settings open_clip built `model.preprocess` from (size, mean, std, ...)."""
    cfg = getattr(model.clip.visual, "preprocess_cfg", None)
    if not cfg:
        raise OpenClipExportError(
            f"model {model.config.get('name')!r} has no visual.preprocess_cfg: it was not built by "
            "open_clip's factory, so its image transform cannot be described to open_clip"
        )
    return json.loads(json.dumps(dict(cfg)))


def write_open_clip_folder(model: FlipModel, folder: Path, verify: bool = True) -> dict[str, Any]:
    """Write config, weights and (Hugging Face tokenizers only) tokenizer files into `folder`.

    With `verify`, open_clip then loads the folder in this process and must give bitwise the same
    weights, the same tokens for PROBE_TEXTS and the same preprocessed image; else the export fails.
    """
    model_cfg = open_clip_model_config(model)
    check_open_clip_exportable(model, model_cfg)
    write_json({"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(model)}, folder / CONFIG_NAME)
    save_state_dict(model.clip.state_dict(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        model.tokenizer.save_pretrained(str(folder))  # open_clip reads it from the folder (local-dir:)
    if verify:
        log.info("loading the folder back with open_clip to compare weights, tokens and transforms")
        verify_open_clip_folder(model, folder)
    return {"model_cfg": model_cfg, "verified": verify}


def _probe_image(model: FlipModel) -> Image.Image:
    size = model.clip.visual.preprocess_cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else size
    pixels = np.random.default_rng(0).integers(0, 256, (height * 2 + 3, width * 2 + 5, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def verify_open_clip_folder(model: FlipModel, folder: Path) -> None:
    """open_clip alone must rebuild the same model, tokenizer and image transform from `folder`."""
    reference = f"local-dir:{folder}"
    clip, _, preprocess = open_clip.create_model_and_transforms(reference)
    tokenizer = open_clip.get_tokenizer(reference)
    ours = model.clip.state_dict()
    theirs = clip.state_dict()
    if set(ours) != set(theirs):
        raise OpenClipExportError(
            f"open_clip rebuilt different parameters from {str(folder)!r}: missing "
            f"{sorted(set(ours) - set(theirs))[:5]}, unexpected {sorted(set(theirs) - set(ours))[:5]}"
        )
    differing = [key for key, value in ours.items() if not torch.equal(value.cpu(), theirs[key])]
    if differing:
        raise OpenClipExportError(f"open_clip loaded other values for {differing[:5]} from {str(folder)!r}")
    if not torch.equal(tokenizer(list(PROBE_TEXTS)), model.tokenize(PROBE_TEXTS)):
        raise OpenClipExportError(
            f"open_clip's tokenizer for {str(folder)!r} ({type(tokenizer).__name__}) tokenizes differently "
            f"from the model's ({type(model.tokenizer).__name__})"
        )
    image = _probe_image(model)
    if not torch.equal(preprocess(image), model.preprocess(image)):
        raise OpenClipExportError(
            f"open_clip's image transform for {str(folder)!r} differs from the model's: {preprocess} vs "
            f"{model.preprocess}"
        )
