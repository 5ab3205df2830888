"""Export the image and text encoders as two ONNX graphs with a dynamic batch dimension.

Each graph computes what open_clip's `encode_image` / `encode_text` return (features before L2
normalisation). The export is traced by torch's dynamo exporter (`torch.onnx.export(...,
dynamo=True)`, the supported path since the TorchScript exporter was deprecated), then run in
onnxruntime at batch sizes other than the traced one and compared with PyTorch: a graph whose
outputs differ by more than `atol` is not written.

`onnx_config.json` beside the graphs says what a user needs without FLIP: input and output
names and shapes, the image transform (`preprocess_cfg`), the tokenizer and context length,
and the learned temperature and bias for zero-shot logits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from torch import nn

from flip.export.files import write_json
from flip.export.open_clip_format import PROBE_TEXTS
from flip.models import FlipModel

IMAGE_NAME = "image_encoder.onnx"
TEXT_NAME = "text_encoder.onnx"
CONFIG_NAME = "onnx_config.json"
FORMAT_NAME = "flip-onnx"
FORMAT_VERSION = 1
CHECK_BATCH_SIZES = (1, 3)  # the graphs are traced at batch 2: both differ from it
log = logging.getLogger(__name__)


class OnnxCheckError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


class ImageEncoder(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(image)


class TextEncoder(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(text)


def image_shape(model: FlipModel) -> tuple[int, int]:
    size = (
        model.clip.visual.preprocess_cfg.get("size", 224)
        if hasattr(model.clip.visual, "preprocess_cfg")
        else 224
    )
    return (size, size) if isinstance(size, int) else tuple(size)


def _example_inputs(model: FlipModel, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *image_shape(model), generator=generator)
    texts = [PROBE_TEXTS[i % len(PROBE_TEXTS)] for i in range(batch)]
    return images, model.tokenize(texts)


def _export_graph(
    module: nn.Module, example: torch.Tensor, input_name: str, output_name: str, path: Path
) -> None:
    batch = torch.export.Dim("batch")
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about open_clip internals, not about the result
        onnx_log.setLevel(logging.ERROR)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamo=True,
            dynamic_shapes={input_name: {0: batch}},
            external_data=False,  # one file per graph; torch still splits weights out past 2 GB
            verbose=False,
        )
    onnx_log.setLevel(level)


def check_onnx_folder(model: FlipModel, folder: Path, atol: float = 1e-4) -> dict[str, float]:
    """Largest |onnxruntime - PyTorch| per encoder and batch size; raise past `atol`."""
    import onnxruntime

    sessions = {
        "image": onnxruntime.InferenceSession(str(folder / IMAGE_NAME), providers=["CPUExecutionProvider"]),
        "text": onnxruntime.InferenceSession(str(folder / TEXT_NAME), providers=["CPUExecutionProvider"]),
    }
    differences = {}
    for batch in CHECK_BATCH_SIZES:
        images, text = _example_inputs(model, batch, seed=batch)
        with torch.no_grad():
            expected = {"image": model.encode_image(images), "text": model.encode_text(text)}
        inputs = {"image": images.numpy(), "text": text.numpy()}
        for tower, session in sessions.items():
            (output,) = session.run(None, {tower: inputs[tower]})
            difference = float(np.abs(output - expected[tower].numpy()).max())
            differences[f"{tower}_batch_{batch}"] = difference
    worst = max(differences, key=differences.get)
    if differences[worst] > atol:
        raise OnnxCheckError(
            f"onnxruntime differs from PyTorch by {differences[worst]:.2e} > atol={atol:g} ({worst}); "
            f"all differences: {differences}"
        )
    return differences


def _tokenizer_info(model: FlipModel, folder: Path) -> dict[str, Any]:
    tokenizer = model.tokenizer
    context_length = int(model.tokenize("").shape[-1])
    if isinstance(tokenizer, open_clip.SimpleTokenizer):
        return {
            "type": "open_clip.SimpleTokenizer",
            "context_length": context_length,
            "usage": f"open_clip.SimpleTokenizer(context_length={context_length})(texts)",
        }
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
        return {
            "type": f"open_clip.{type(tokenizer).__name__}: a Hugging Face tokenizer saved in this folder",
            "context_length": context_length,
            "usage": f"open_clip.HFTokenizer('<this folder>', context_length={context_length})(texts)",
        }
    return {"type": type(tokenizer).__name__, "context_length": context_length}


def write_onnx_folder(model: FlipModel, folder: Path, atol: float = 1e-4) -> dict[str, Any]:
    """Write both graphs and onnx_config.json into `folder`, checked against PyTorch first."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(
            f"ONNX export traces and checks on the CPU; the model is on {device}: give model.cpu()"
        )
    model = model.eval()
    images, text = _example_inputs(model, batch=2, seed=0)
    with torch.no_grad():
        embed_dim = int(model.encode_image(images[:1]).shape[-1])
    log.info("tracing the image encoder (torch.onnx dynamo exporter)")
    _export_graph(ImageEncoder(model.clip), images, "image", "image_features", folder / IMAGE_NAME)
    log.info("tracing the text encoder")
    _export_graph(TextEncoder(model.clip), text, "text", "text_features", folder / TEXT_NAME)
    log.info("checking both graphs with onnxruntime against PyTorch at batch sizes %s", CHECK_BATCH_SIZES)
    differences = check_onnx_folder(model, folder, atol)
    import onnxruntime

    height, width = image_shape(model)
    logit_bias = model.logit_bias
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "image_encoder": {
            "file": IMAGE_NAME,
            "input": {"name": "image", "shape": ["batch", 3, height, width], "dtype": "float32"},
            "output": {"name": "image_features", "shape": ["batch", embed_dim], "dtype": "float32"},
        },
        "text_encoder": {
            "file": TEXT_NAME,
            "input": {"name": "text", "shape": ["batch", int(text.shape[1])], "dtype": "int64"},
            "output": {"name": "text_features", "shape": ["batch", embed_dim], "dtype": "float32"},
        },
        "features": "as open_clip's encode_image/encode_text: L2-normalise before cosine similarity",
        "logit_scale": float(model.logit_scale.detach().exp()),
        "logit_bias": None if logit_bias is None else float(logit_bias.detach().reshape(-1)[0]),
        "preprocess_cfg": dict(getattr(model.clip.visual, "preprocess_cfg", {})),
        "tokenizer": _tokenizer_info(model, folder),
        "model": {**model.config, "pretrained": None},
        "check": {
            "atol": atol,
            "max_abs_difference": differences,
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
        },
    }
    write_json(config, folder / CONFIG_NAME)
    return {"max_abs_difference": differences}
