"""Image hygiene: decode defensively, normalise to upright 8-bit RGB, crop, resize, encode.

Real collections hold every kind of file: zero-byte downloads, truncated JPEGs, HTML saved
as `.jpg`, CMYK print scans, RGBA and palette PNGs, 16-bit medical-style grayscale, phone
photos stored sideways with an EXIF orientation tag, and the occasional decompression bomb.
Each bad file raises `SkipSample` with a reason from `REASONS`, so the writer can count it
and go on; every file that can be decoded comes out as an upright RGB JPEG.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "REASONS",
    "HygieneConfig",
    "SkipSample",
    "check_face",
    "crop_box",
    "decode_image",
    "decode_rgb",
    "encode_jpeg",
    "finish",
    "process_image",
]

# every reason a sample can be skipped for, with what it means (the report explains its counts)
REASONS: dict[str, str] = {
    "empty_image": "the image file has zero bytes",
    "corrupt_image": "not a decodable image (wrong format, garbage bytes)",
    "truncated_image": "the image data ends early",
    "decompression_bomb": "more pixels than --max-pixels (a decompression-bomb guard)",
    "missing_image": "listed, but the image file does not exist or cannot be read",
    "path_outside_root": "a listed image path leads outside the dataset folder (../, absolute, symlink out)",
    "not_downloaded": "a FaceCaption-15M row whose url is not among the downloaded images",
    "missing_caption": "no caption (no caption row for the image, or a null caption)",
    "empty_caption": "the caption is empty or only whitespace",
    "non_utf8_caption": "the caption bytes are not valid UTF-8",
    "not_text_caption": "the caption is not text (a number, a list inside a list, a mapping)",
    "control_characters": "the caption holds control characters (NUL, ESC, ...): binary or corrupted text",
    "duplicate_row": "a captions-file row repeating an earlier row's image and caption",
    "bad_row": "a captions-file row that cannot be parsed (bad JSON line, no image column)",
    "duplicate_key": "a key already written by an earlier sample (the same --key-column value or face)",
    "bad_box": "the face box is malformed, empty or outside the image",
    "box_mismatch": "img2dataset padded or cropped the image, so the box cannot be mapped into it",
    "small_face": "the face is smaller than --min-face-size",
    "no_face": "--detect-faces found no face",
    "no_face_in_box": "--align on a given box: MTCNN found no face matching the box (IoU >= 0.3) around it",
    "low_confidence": "--detect-faces found faces, none as confident as --min-confidence",
    "bad_landmarks": "--align: the face's landmarks fit no similarity transform",
    "not_a_tar": "an input .tar file is not a tar archive at all (empty, or other content)",
    "truncated_tar": "an input tar shard ends early (its readable members are still used)",
    # flip-data curate: a sample's metadata, then its filters in the order they run
    "bad_json": "the sample's .json member is not a JSON object",
    "caption_too_short": "curate: fewer words or characters than --min-words / --min-chars",
    "caption_too_long": "curate: more words or characters than --max-words / --max-chars",
    "caption_url": "curate: the caption holds a URL, a web address or an e-mail address",
    "caption_few_letters": "curate: letters are under --min-letter-fraction of the caption's characters",
    "caption_repeats": "curate: one character repeated more than --max-repeat times in a row",
    "exact_duplicate": "curate: the same pixels as a sample kept (and caption, with --dedup-on pair)",
    "near_duplicate": "curate: perceptual hash within --max-hash-distance bits of a sample kept",
    "embedding_duplicate": "curate: image embedding cosine >= --min-embedding-cosine with a sample kept",
    "low_agreement": "curate: image-text cosine under --min-agreement, or outside --keep-top-fraction",
    "entry_full": "curate: balancing: an entry the caption matches already has --max-per-entry samples",
    "entry_sampled_out": "curate: balancing (--balance metaclip): not drawn by any entry the caption matches",
    "no_entry": "curate: the caption matches no balancing entry (--unmatched drop)",
}


class SkipSample(Exception):
    """A sample that must be skipped; `reason` is a key of `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class HygieneConfig:
    """How every written image is normalised.

    `resize_short_side` only ever shrinks (None keeps the size); `max_pixels` bounds what
    is decoded at all (PIL's own default is ~89 M pixels).
    """

    jpeg_quality: int = 95
    resize_short_side: int | None = None
    max_pixels: int = 89_478_485
    face_margin: float = 0.2
    square_crop: bool = True
    min_face_size: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality}; accepted: 1..100")
        if self.resize_short_side is not None and self.resize_short_side < 8:
            raise ValueError(f"resize_short_side={self.resize_short_side}; accepted: >= 8 or None")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels={self.max_pixels}; accepted: >= 1")
        if not 0.0 <= self.face_margin <= 4.0:
            raise ValueError(f"face_margin={self.face_margin}; accepted: 0..4 (a fraction of the box size)")
        if self.min_face_size < 0:
            raise ValueError(f"min_face_size={self.min_face_size}; accepted: >= 0")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decoded image (not yet converted), or SkipSample saying why it cannot be."""
    if not data:
        raise SkipSample("empty_image")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode grey
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between max_pixels and twice that; both are bombs here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:  # formats that skip PIL's own check
                raise SkipSample("decompression_bomb", f"{image.width}x{image.height} pixels")
            image.load()
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipSample("decompression_bomb", str(exc)[:200]) from None
    except UnidentifiedImageError:
        raise SkipSample(
            "corrupt_image", f"not an image format PIL knows (starts with {data[:12]!r})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        text = str(exc)
        reason = (
            "truncated_image" if "truncat" in text.lower() or isinstance(exc, EOFError) else "corrupt_image"
        )
        raise SkipSample(reason, f"{type(exc).__name__}: {text[:200]}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from any mode: EXIF orientation applied, alpha over white, 16-bit scaled."""
    with contextlib.suppress(Exception):  # a malformed EXIF block: keep the pixels as stored
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def crop_box(
    box: tuple[float, float, float, float], size: tuple[int, int], margin: float, square: bool
) -> tuple[int, int, int, int]:
    """The pixel crop for a face box (x0, y0, x1, y1): grown by `margin` of its size, made
    square around its centre if asked, then clipped to the image."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w, half_h = width * (1 + 2 * margin) / 2, height * (1 + 2 * margin) / 2
    if square:
        half_w = half_h = max(half_w, half_h)
    left, top = max(0, round(cx - half_w)), max(0, round(cy - half_h))
    right, bottom = min(size[0], round(cx + half_w)), min(size[1], round(cy + half_h))
    return left, top, right, bottom


def check_box(box: object, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A face box as 4 finite floats (x0, y0, x1, y1) with positive area inside the image."""
    try:
        values = [float(v) for v in box]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise SkipSample("bad_box", f"box {box!r} is not 4 numbers") from None
    if len(values) != 4 or not all(np.isfinite(values)):
        raise SkipSample("bad_box", f"box {box!r} is not 4 finite numbers")
    x0, y0, x1, y1 = values
    x0, x1 = max(0.0, x0), min(float(size[0]), x1)
    y0, y1 = max(0.0, y0), min(float(size[1]), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise SkipSample("bad_box", f"box {box!r} has no area inside the {size[0]}x{size[1]} image")
    return x0, y0, x1, y1


def check_face(box: object, size: tuple[int, int], min_face_size: float) -> tuple[float, float, float, float]:
    """A given face box inside the image (`check_box`) whose shorter side is >= `min_face_size`."""
    face = check_box(box, size)
    if min(face[2] - face[0], face[3] - face[1]) < min_face_size:
        raise SkipSample("small_face", f"{face[2] - face[0]:.0f}x{face[3] - face[1]:.0f} < {min_face_size}")
    return face


def resize_short_side(image: Image.Image, short_side: int | None) -> Image.Image:
    if short_side is None or min(image.size) <= short_side:
        return image
    scale = short_side / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass
class ProcessedImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    crop: tuple[int, int, int, int] | None


@dataclass
class DecodedImage:
    """An image decoded to upright RGB, with what `finish` needs to write it: the bytes (a JPEG
    that needs no change is passed through) and the size as stored."""

    data: bytes
    image: Image.Image
    original_size: tuple[int, int]
    passthrough: bool


def decode_rgb(data: bytes, config: HygieneConfig) -> DecodedImage:
    """Decoded, upright 8-bit RGB, or SkipSample saying why not."""
    raw = decode_image(data, config.max_pixels)
    passthrough = raw.format == "JPEG" and raw.mode == "RGB" and _orientation(raw) in (None, 1)
    return DecodedImage(data, to_rgb(raw), raw.size, passthrough)


def finish(decoded: DecodedImage, config: HygieneConfig, box: object | None = None) -> ProcessedImage:
    """The face crop of `box` (if given), resized and encoded.

    A JPEG that needs no change (RGB, upright, no crop or resize) is passed through byte for
    byte: re-encoding would only lose quality.
    """
    image, crop = decoded.image, None
    if box is not None:
        face = check_face(box, image.size, config.min_face_size)
        crop = crop_box(face, image.size, config.face_margin, config.square_crop)
        image = image.crop(crop)
    resized = resize_short_side(image, config.resize_short_side)
    if decoded.passthrough and crop is None and resized is image:
        jpeg = decoded.data
    else:
        jpeg = encode_jpeg(resized, config.jpeg_quality)
    width, height = decoded.original_size
    return ProcessedImage(jpeg, resized.width, resized.height, width, height, crop)


def process_image(data: bytes, config: HygieneConfig, box: object | None = None) -> ProcessedImage:
    """Bytes in, hygienic JPEG out: decode, upright RGB, face crop (of a given box), resize."""
    return finish(decode_rgb(data, config), config, box)


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # a broken EXIF block is no reason to drop the pixels
        return None
