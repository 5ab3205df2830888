"""Faces whose landmarks are known: FaceShapes drawn at a chosen pose (the renderer places the
eyes by a similarity transform of its unit-square layout), and a real photo (skimage's
astronaut) with its eyes read off the image by hand."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image

from flip.data.faceshapes.render import BASE_ZOOM, ZOOM_CENTER, render_face

# FaceShapes' layout (flip/data/faceshapes/render.py, _Face): eyes at cx -/+ 0.085, eye_y = cy - 0.005
EYES_UNIT = np.array([[0.5 - 0.085, 0.495], [0.5 + 0.085, 0.495]])
# skimage.data.astronaut() at 256 x 256: the centres of her pupils, read by eye from the photo
ASTRONAUT_EYES_256 = np.array([[101.5, 50.5], [123.5, 52.0]])


def faceshapes_face(angle: float, scale: float, dx: float, dy: float, size: int = 160) -> Image.Image:
    """A frontal FaceShapes face (grey background, no accessories) at the given pose."""
    pose = {"angle": angle, "scale": scale, "dx": dx, "dy": dy}
    return render_face({"pose": pose, "expression": "neutral"}, random.Random(0), size=size)


def faceshapes_eyes(angle: float, scale: float, dx: float, dy: float, size: int = 160) -> np.ndarray:
    """Where the renderer puts the pupils [2, 2] (left, right as seen): its pen's transform,
    rotation by `angle` and scale `scale * BASE_ZOOM * size` about ZOOM_CENTER, then the shift."""
    a = math.radians(angle)
    rotation = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) * scale * BASE_ZOOM * size
    return (EYES_UNIT - np.array(ZOOM_CENTER)) @ rotation.T + np.array([0.5 + dx, 0.5 + dy]) * size


def astronaut(side: int = 256) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BILINEAR)


PHOTO_CAPTIONS = {
    "astronaut.jpg": "a smiling woman with short blond hair",
    "pair.jpg": "two smiling women",
    "small.jpg": "a woman in a space suit",
    "wall.jpg": "an empty wall",
}


def write_photos(folder) -> None:
    """docs/data.md's folder of photos: one face of ~175 px, two people (faces of ~190 and
    ~140 px), a face of ~90 px (under FaceCaption-15M's 128) and a wall, with captions.csv."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(data.astronaut())
    photo.resize((1024, 1024), Image.Resampling.BICUBIC).save(folder / "astronaut.jpg", quality=90)
    head = photo.crop((120, 0, 330, 260))  # her head and shoulders; the face is ~90 px wide
    pair = Image.new("RGB", (900, 560), (200, 200, 205))
    pair.paste(head.resize((462, 572)).crop((0, 0, 462, 560)), (0, 0))
    pair.paste(head.resize((336, 416)), (520, 144))
    pair.save(folder / "pair.jpg", quality=90)
    photo.save(folder / "small.jpg", quality=90)
    Image.new("RGB", (640, 480), (180, 170, 160)).save(folder / "wall.jpg", quality=90)
    rows = ["file_name,caption", *(f"{name},{caption}" for name, caption in PHOTO_CAPTIONS.items())]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")


ALBUM_CAPTIONS = {
    "astronaut.jpg": "a smiling woman with short blond hair",
    "astronaut_again.jpg": "an astronaut smiling at the camera",
    "portrait.jpg": "a black and white photo of a smiling man with dark hair",
    "scan.jpg": "IMG_0042.JPG www.example.com/photos",
}


def _lfw_portrait(index: int):
    """`skimage.data.lfw_subset()` face `index` (25 px, grey) enlarged to a 260 px face on a
    360 px grey canvas: a real face MTCNN finds with confidence > 0.99 and a ~200 px box."""
    from skimage import data

    face = np.uint8(np.clip(data.lfw_subset()[index] * 255, 0, 255))
    canvas = Image.new("RGB", (360, 360), (128, 128, 128))
    canvas.paste(Image.fromarray(face).convert("RGB").resize((260, 260), Image.Resampling.BICUBIC), (50, 50))
    return canvas


def write_album(folder) -> None:
    """docs/data.md's photos-to-curated-shards example: the astronaut, the same file again, and
    two LFW faces (the second with a junk caption: a file name and a web address), with
    captions.csv."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(data.astronaut()).resize((1024, 1024), Image.Resampling.BICUBIC)
    photo.save(folder / "astronaut.jpg", quality=90)
    (folder / "astronaut_again.jpg").write_bytes((folder / "astronaut.jpg").read_bytes())
    _lfw_portrait(1).save(folder / "portrait.jpg", quality=90)
    _lfw_portrait(3).save(folder / "scan.jpg", quality=90)
    rows = ["file_name,caption", *(f"{name},{caption}" for name, caption in ALBUM_CAPTIONS.items())]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
