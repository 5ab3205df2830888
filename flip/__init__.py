"""FLIP: contrastive face-language pretraining and evaluation."""

from flip.checkpoint import load
from flip.config import register_resolvers

register_resolvers()

__all__ = ["load"]
__version__ = "0.1.0"
