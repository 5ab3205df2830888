"""Contrastive losses: CLIP (InfoNCE), SigLIP (sigmoid), FILIP (token late interaction) and momentum
ITC with queues (ALBEF/FLIP)."""

from flip.losses.clip import ClipLoss
from flip.losses.combined import CombinedLoss, build_loss
from flip.losses.filip import FilipLoss, filip_similarity
from flip.losses.itc_queue import MomentumItcLoss
from flip.losses.siglip import SigLipLoss

__all__ = [
    "ClipLoss",
    "CombinedLoss",
    "FilipLoss",
    "MomentumItcLoss",
    "SigLipLoss",
    "build_loss",
    "filip_similarity",
]
