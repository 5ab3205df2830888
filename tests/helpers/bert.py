"""A Hugging Face BERT text tower written to a local folder, as `transformers` saves any model: the
HF-tower tests run offline and download nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from .configs import TINY_ARCH

WORDS = ["a", "an", "the", "person", "with", "red", "green", "blue", "yellow", "square", "face", "hat"]


def write_tiny_bert(directory: Path, with_weights: bool = True, seed: int = 0) -> Path:
    """A 1-layer BERT (hidden 32) with its tokenizer, saved as `transformers` saves any model."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    config = BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    if with_weights:
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(directory)
    else:
        config.save_pretrained(directory)
    return directory


def bert_arch(path: Path, pooling: str = "cls", pretrained: bool = False, projection: str = "linear") -> dict:
    """The tiny architecture with the BERT folder at `path` as its text tower."""
    arch = copy.deepcopy(TINY_ARCH)
    arch["text_cfg"] = {
        "hf_model_name": str(path), "hf_tokenizer_name": str(path), "hf_model_pretrained": pretrained,
        "hf_pooler_type": pooling, "hf_proj_type": projection, "context_length": 16,
    }  # fmt: skip
    return arch
