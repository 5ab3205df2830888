from flip.models.factory import build_model, register_architecture
from flip.models.flip_model import FlipModel
from flip.models.outputs import EncoderOutput

__all__ = ["EncoderOutput", "FlipModel", "build_model", "register_architecture"]
