"""Contrastive losses: CLIP (InfoNCE), SigLIP (sigmoid) and FILIP (token late interaction)."""

from flip.losses.clip import ClipLoss
from flip.losses.combined import CombinedLoss, build_loss
from flip.losses.filip import FilipLoss, filip_similarity
from flip.losses.siglip import SigLipLoss

__all__ = ["ClipLoss", "CombinedLoss", "FilipLoss", "SigLipLoss", "build_loss", "filip_similarity"]
