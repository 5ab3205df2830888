"""Face alignment: a similarity transform that puts five landmarks on a canonical template.

The template is the one the face-recognition references align to (insightface's `arcface_dst`,
used for ArcFace training and the LFW/CALFW/CPLFW verification protocols): left eye, right eye,
nose tip, left and right mouth corner in a 112 x 112 crop. `AlignConfig.size` scales it to the
output size (224 px by default, the input of FLIP's ViT-B/16), and `padding` shrinks it towards
the centre by that fraction of the size on each side, so the crop shows more around the face
(hair, hats, earrings: what captions talk about); padding 0 is the ArcFace crop exactly.

The transform (rotation, uniform scale, translation) is the least-squares fit of the five
points (Umeyama), estimated by scikit-image as insightface does, and the warp is OpenCV's
bilinear `warpAffine`. An image shrunk by more than 2x is first box-reduced by an integer
factor (PIL's `reduce`), so the warp does not alias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["ARCFACE_112", "AlignConfig", "Aligned", "align_face", "estimate_similarity", "template"]

# insightface's arcface_dst: (x, y) in a 112 x 112 crop, pixel centres at integer coordinates
ARCFACE_112 = np.array(
    [
        [38.2946, 51.6963],  # left eye (as seen in the image)
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)
TEMPLATE_NAME = "arcface_112"


@dataclass(frozen=True)
class AlignConfig:
    """Output size (pixels, square) and padding (a fraction of the size on each side, 0..0.45)."""

    size: int = 224
    padding: float = 0.0

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"align size={self.size}; accepted: >= 16 pixels")
        if not 0.0 <= self.padding <= 0.45:
            raise ValueError(f"align padding={self.padding}; accepted: 0..0.45 (a fraction of the size)")

    def describe(self) -> dict:
        return {"template": TEMPLATE_NAME, "size": self.size, "padding": self.padding}


def template(config: AlignConfig) -> np.ndarray:
    """The five target points [5, 2] in the output image."""
    unit = (ARCFACE_112 / 112.0 + config.padding) / (1.0 + 2.0 * config.padding)
    return unit * config.size


def estimate_similarity(landmarks: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 3 x 3 similarity matrix taking `landmarks` [5, 2] to `target` in the least-squares sense."""
    from skimage.transform import SimilarityTransform

    src = np.asarray(landmarks, dtype=np.float64)
    if src.shape != target.shape or not np.isfinite(src).all():
        raise ValueError(f"landmarks must be {len(target)} finite (x, y) points; got {src.tolist()}")
    transform = SimilarityTransform.from_estimate(src, target) if np.ptp(src, axis=0).max() > 1e-6 else None
    if not transform or not np.isfinite(transform.params).all():
        raise ValueError(f"no similarity transform fits the landmarks {src.round(2).tolist()} (one point?)")
    return np.asarray(transform.params)


@dataclass
class Aligned:
    """The aligned face, the 2 x 3 matrix from original to aligned pixels, and the landmarks as
    they land in the aligned image (the template, up to the fit's residual)."""

    image: Image.Image
    matrix: np.ndarray
    landmarks: np.ndarray

    def record(self, config: AlignConfig) -> dict:
        """The `align` entry of a sample's `.json`."""
        return {
            **config.describe(),
            "matrix": np.round(self.matrix, 6).tolist(),
            "landmarks": np.round(self.landmarks, 2).tolist(),
        }


def align_face(image: Image.Image, landmarks: np.ndarray, config: AlignConfig) -> Aligned:
    """`image` warped so that `landmarks` (original pixels) fall on the template."""
    import cv2

    matrix = estimate_similarity(landmarks, template(config))
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    source, warp = image, matrix
    factor = int(1.0 / scale) if scale < 0.5 else 1
    if factor > 1:  # box-reduce first: reduced pixel j covers original pixels factor*j .. factor*j+factor-1
        source = image.reduce(factor)
        offset = (factor - 1) / 2.0
        warp = matrix @ np.array([[factor, 0.0, offset], [0.0, factor, offset], [0.0, 0.0, 1.0]])
    pixels = cv2.warpAffine(
        np.asarray(source.convert("RGB")),
        warp[:2],
        (config.size, config.size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    points = np.asarray(landmarks, dtype=np.float64) @ matrix[:2, :2].T + matrix[:2, 2]
    return Aligned(Image.fromarray(pixels, "RGB"), matrix[:2].copy(), points)
