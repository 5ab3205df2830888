"""FLIP: contrastive face-language pretraining and evaluation."""

from flip.checkpoint import load

__all__ = ["load"]
__version__ = "0.1.0"
