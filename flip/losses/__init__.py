"""Contrastive losses: CLIP (InfoNCE), SigLIP (sigmoid), FILIP (token late interaction) and momentum
ITC with queues (ALBEF/FLIP); image-text matching on hard negatives (ITM)."""

from flip.losses.clip import ClipLoss
from flip.losses.combined import CombinedLoss, build_loss
from flip.losses.filip import FilipLoss, filip_similarity
from flip.losses.itc_queue import MomentumItcLoss
from flip.losses.itm import ItmLoss
from flip.losses.siglip import SigLipLoss

__all__ = [
    "ClipLoss",
    "CombinedLoss",
    "FilipLoss",
    "ItmLoss",
    "MomentumItcLoss",
    "SigLipLoss",
    "build_loss",
    "filip_similarity",
]
