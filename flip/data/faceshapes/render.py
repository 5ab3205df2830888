"""Draws a FaceShapes record as a cartoon face.

Every attribute is drawn big and in a distinctive colour or shape, because the model sees
the face at 64x64 after JPEG: a feature smaller than a couple of pixels cannot be learned and
would only add label noise. The small ones are drawn bigger than life and in colours nothing
else has (full-strength blush, a mustache darker than the hair, gold or turquoise drops, a
fringe down to the brows). At natural size and colour they stayed near chance in the demo
model's linear probe (the scores before and after: docs/data.md, "Why FaceShapes looks the
way it does").

Shapes are polygons in a unit square; the pose (rotation, scale, shift) is applied to their
points, so the whole face is drawn once, already posed, at 4x the output size and then
LANCZOS-downsampled for anti-aliasing, which is much faster than rotating a rendered layer.

`render_face_parts` also paints every shape, in the same order, with the id of the part it
belongs to (`PART_CLASSES`) onto a label canvas, and places a few landmarks
(`LANDMARKS`) through the same pose: the masks and points of the dense demo tasks. The RGB
image it returns is `render_face`'s, pixel for pixel: the labels take no draws from `rng`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from flip.data.faceshapes.attributes import EARRING_COLORS, HAIR_RGB, SKIN_TONES

__all__ = ["IDENTITY_POSE", "LANDMARKS", "PART_CLASSES", "RenderedFace", "render_face", "render_face_parts"]

SUPERSAMPLE = 4
# Zoomed in so the face fills the frame: hat brims and long hair may leave it, but glasses,
# lipstick and earrings get ~1.7x the pixels they had at 1.1, and the 64 px demo model learns
# more of them in its budget (zero-shot by zoom: docs/data.md, "Why FaceShapes looks the way it does")
BASE_ZOOM = 1.45
ZOOM_CENTER = (0.5, 0.52)  # the layout point that lands at the image centre (before the shift)
IDENTITY_POSE = {"angle": 0.0, "scale": 1.0, "dx": 0.0, "dy": 0.0}
FACE_SIZE = {"round": (0.245, 0.275), "oval": (0.225, 0.295), "long": (0.2, 0.315)}  # half width/height
EYE_COLORS = {"dark": (40, 30, 25), "blue": (50, 110, 190), "green": (50, 130, 70), "brown": (110, 65, 30)}
LIPSTICK = (210, 18, 48)
BLUSH = (240, 60, 110)
Color = tuple[int, int, int]
Point = tuple[float, float]
# the parts of the label mask, by id; each shape is painted with its part, later shapes on top
PART_CLASSES = ("background", "skin", "neck", "cloth", "hair", "facial_hair", "eye", "brow", "nose", "mouth")
PART_CLASSES += ("glasses", "earring", "hat")
_PART = {name: i for i, name in enumerate(PART_CLASSES)}
# left and right as seen in the image (the person's right eye is the image's left one)
LANDMARKS = ("left_eye", "right_eye", "left_brow", "right_brow", "nose_tip", "mouth_left", "mouth_right")
LANDMARKS += ("chin",)


def _mix(a: Sequence[int], b: Sequence[int], t: float) -> Color:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _shade(c: Sequence[int], f: float) -> Color:
    return (min(255, round(c[0] * f)), min(255, round(c[1] * f)), min(255, round(c[2] * f)))


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 24) -> list[Point]:
    """Points on an ellipse from angle a0 to a1 (radians, y pointing down)."""
    return [
        (cx + rx * math.cos(a0 + (a1 - a0) * i / n), cy + ry * math.sin(a0 + (a1 - a0) * i / n))
        for i in range(n + 1)
    ]


def _superellipse(cx: float, cy: float, rx: float, ry: float, n: int = 32) -> list[Point]:
    """A rounded rectangle (|x|^4 + |y|^4 = 1), for square glasses frames."""
    pts = []
    for i in range(n):
        a = 2 * math.pi * i / n
        c, s = math.cos(a), math.sin(a)
        pts.append((cx + rx * math.copysign(abs(c) ** 0.5, c), cy + ry * math.copysign(abs(s) ** 0.5, s)))
    return pts


class _Pen:
    """Draws unit-square shapes through the pose transform onto the supersampled canvas, and
    with `labels` (an "L" canvas of the same size) each one in the id of the current `part`."""

    def __init__(
        self, image: Image.Image, pose: Mapping[str, float], labels: Image.Image | None = None
    ) -> None:
        self.draw = ImageDraw.Draw(image)
        self.labels = None if labels is None else ImageDraw.Draw(labels)
        self.part = 0
        size = image.size[0]
        angle = math.radians(float(pose.get("angle", 0.0)))
        self.unit = float(pose.get("scale", 1.0)) * BASE_ZOOM * size
        c, s = math.cos(angle) * self.unit, math.sin(angle) * self.unit
        self.m = (c, s, -s, c)
        self.t = ((0.5 + float(pose.get("dx", 0.0))) * size, (0.5 + float(pose.get("dy", 0.0))) * size)

    def _map(self, points: Sequence[Point]) -> list[Point]:
        m0, m1, m2, m3 = self.m
        tx, ty = self.t
        ox, oy = ZOOM_CENTER
        return [(m0 * (x - ox) + m1 * (y - oy) + tx, m2 * (x - ox) + m3 * (y - oy) + ty) for x, y in points]

    def polygon(self, points: Sequence[Point], fill: Color) -> None:
        mapped = self._map(points)
        self.draw.polygon(mapped, fill=fill)
        if self.labels is not None:
            self.labels.polygon(mapped, fill=self.part)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: Color, n: int = 36) -> None:
        self.polygon(_arc(cx, cy, rx, ry, 0.0, 2 * math.pi, n)[:-1], fill)

    def line(self, points: Sequence[Point], color: Color, width: float, closed: bool = False) -> None:
        pts = list(points) + ([points[0], points[1]] if closed else [])
        mapped, pixels = self._map(pts), max(1, round(width * self.unit))
        self.draw.line(mapped, fill=color, width=pixels, joint="curve")
        if self.labels is not None:
            self.labels.line(mapped, fill=self.part, width=pixels, joint="curve")

    def dot(self, x: float, y: float, r: float, color: Color) -> None:
        self.ellipse(x, y, r, r, color, n=16)


def _background(spec: Mapping, size: int) -> np.ndarray:
    c1 = np.asarray(spec.get("color", (128, 128, 128)), dtype=np.float32)
    if spec.get("kind") != "gradient" or spec.get("color2") is None:
        return np.broadcast_to(c1, (size, size, 3)).copy()
    c2 = np.asarray(spec["color2"], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    direction = spec.get("direction", "vertical")
    if direction == "horizontal":
        t = np.broadcast_to(ramp[None, :], (size, size))
    elif direction == "diagonal":
        t = (ramp[:, None] + ramp[None, :]) / 2
    else:
        t = np.broadcast_to(ramp[:, None], (size, size))
    return c1 + (c2 - c1) * t[..., None]


class _Face:
    """Geometry and colours of one face; each method draws one part, in painter's order."""

    def __init__(self, attrs: Mapping[str, object], pen: _Pen) -> None:
        self.a, self.pen = attrs, pen
        style: Mapping = attrs.get("style") or {}  # type: ignore[assignment]
        self.style = style
        self.w, self.h = FACE_SIZE.get(str(attrs.get("face_shape", "oval")), FACE_SIZE["oval"])
        self.cx, self.cy = 0.5, 0.5
        self.skin = SKIN_TONES.get(str(attrs.get("skin_tone", "light")), SKIN_TONES["light"])
        hair = attrs.get("hair_color")
        self.hair = HAIR_RGB[str(hair)] if hair in HAIR_RGB else None
        facial = self.hair or HAIR_RGB[str(style.get("facial_hair_color", "brown"))]
        self.facial = _shade(facial, 0.85)
        self.expression = str(attrs.get("expression", "neutral"))
        self.eye_y = self.cy - 0.005
        self.mouth_y = self.cy + 0.165
        self.hairline = self.cy - self.h * 0.55

    def on(self, name: str) -> bool:
        return bool(self.a.get(name, False))

    def part(self, name: str) -> None:
        """The part the next shapes belong to (the label mask's class)."""
        self.pen.part = _PART[name]

    def body(self) -> None:
        p, cx, cy = self.pen, self.cx, self.cy
        self.part("cloth")
        p.ellipse(cx, 1.05, 0.38, 0.2, tuple(self.style.get("shirt_color", (70, 90, 140))))
        if self.on("long_hair") and self.hair:
            self.part("hair")
            w, h = self.w, self.h
            top = _arc(cx, cy - 0.01, w * 1.22, h * 1.06, math.pi, 2 * math.pi)
            shape = [
                *top,
                (cx + w * 1.32, 0.86),
                (cx + w * 1.05, 0.93),
                (cx - w * 1.05, 0.93),
                (cx - w * 1.32, 0.86),
            ]
            p.polygon(shape, self.hair)
            p.line(shape, _shade(self.hair, 0.7), 0.008, closed=True)
        neck = _shade(self.skin, 0.86)
        self.part("neck")
        p.polygon(
            [
                (cx - 0.075, cy + self.h * 0.6),
                (cx + 0.075, cy + self.h * 0.6),
                (cx + 0.08, 0.9),
                (cx - 0.08, 0.9),
            ],
            neck,
        )

    def head(self) -> None:
        p, cx, cy, w, h = self.pen, self.cx, self.cy, self.w, self.h
        self.part("skin")
        for side in (-1, 1):
            p.ellipse(cx + side * w * 0.98, cy + 0.03, 0.032, 0.05, _shade(self.skin, 0.93))
        outline = _arc(cx, cy, w, h, 0.0, 2 * math.pi, 40)
        p.polygon(outline, self.skin)
        p.line(outline, _shade(self.skin, 0.78), 0.006, closed=True)

    def hair_top(self) -> None:
        p, cx, cy, w, h = self.pen, self.cx, self.cy, self.w, self.h
        if self.on("bald") or self.hair is None:  # a shiny skin-coloured dome says "bald"
            self.part("skin")
            p.ellipse(cx - w * 0.3, cy - h * 0.72, w * 0.24, h * 0.09, _mix(self.skin, (255, 255, 255), 0.4))
            return
        self.part("hair")
        inner_ry = cy + 0.03 - self.hairline
        outer = _arc(cx, cy - 0.02, w * 1.07, h * 1.04, math.pi - 0.25, 2 * math.pi + 0.25)
        inner = _arc(cx, cy + 0.03, w * 0.86, inner_ry, 2 * math.pi + 0.25, math.pi - 0.25)
        p.polygon(outer + inner, self.hair)
        p.line(outer, _shade(self.hair, 0.7), 0.008)
        if self.on("bangs"):
            fringe_y = self.eye_y - 0.065
            teeth = 7
            fringe = [
                (cx + w * 0.9 * (2 * i / (2 * teeth) - 1), fringe_y - (0.04 if i % 2 else 0.0))
                for i in range(2 * teeth + 1)
            ]
            # close the fringe along the hairline, from where it is just above the fringe's ends
            ry = inner_ry + 0.01
            a = math.asin(min(1.0, (cy + 0.03 - fringe_y + 0.03) / ry))
            top = _arc(cx, cy + 0.03, w * 0.9, ry, 2 * math.pi - a, math.pi + a, 12)
            p.polygon(fringe + top, self.hair)

    def beard_and_cheeks(self) -> None:
        p, cx, cy, w, h = self.pen, self.cx, self.cy, self.w, self.h
        if self.on("beard"):
            self.part("facial_hair")
            outer = _arc(cx, cy, w * 1.04, h * 1.05, 0.05, math.pi - 0.05)
            inner = _arc(cx, cy + 0.02, w * 0.8, h * 0.55, math.pi - 0.05, 0.05)
            p.polygon(outer + inner, self.facial)
        if self.on("rosy_cheeks"):
            blush = _mix(self.skin, BLUSH, 0.9)
            self.part("skin")
            for side in (-1, 1):
                p.ellipse(cx + side * 0.13, cy + 0.075, 0.052, 0.04, blush)

    def eyes(self) -> None:
        p, cx, ey, e = self.pen, self.cx, self.eye_y, self.expression
        iris = EYE_COLORS.get(str(self.style.get("eye_color", "dark")), EYE_COLORS["dark"])
        ry = 0.032 if e == "surprised" else 0.024
        self.part("eye")
        for side in (-1, 1):
            x = cx + side * 0.085
            p.ellipse(x, ey, 0.04, ry, (250, 250, 250))
            p.dot(x, ey, 0.018, iris)
            p.dot(x, ey, 0.009, (10, 10, 10))
        by = ey - 0.055
        # (outer end, middle, inner end) heights per expression
        heights = {
            "neutral": (0.0, 0.0, 0.0),
            "happy": (0.0, -0.012, -0.004),
            "sad": (0.008, -0.008, -0.028),
            "surprised": (-0.025, -0.045, -0.03),
            "angry": (-0.018, 0.0, 0.028),
        }[e if e in ("happy", "sad", "surprised", "angry") else "neutral"]
        brow = _shade(self.facial, 0.75)
        self.part("brow")
        for side in (-1, 1):
            xs = (cx + side * 0.13, cx + side * 0.088, cx + side * 0.045)
            p.line([(x, by + dy) for x, dy in zip(xs, heights, strict=True)], brow, 0.02)

    def nose(self) -> None:
        p, cx, cy = self.pen, self.cx, self.cy
        self.part("nose")
        p.line(
            [(cx, self.eye_y + 0.03), (cx - 0.014, cy + 0.085), (cx + 0.012, cy + 0.09)],
            _shade(self.skin, 0.72),
            0.011,
        )

    def mustache(self) -> None:
        if not self.on("mustache"):
            return
        cx, my = self.cx, self.mouth_y
        wing = [(0.095, -0.002), (0.078, -0.036), (0.03, -0.058), (0.0, -0.05)]
        shape = [(cx + x, my + y) for x, y in wing] + [(cx - x, my + y) for x, y in reversed(wing)]
        shape += [(cx - 0.045, my - 0.018), (cx, my - 0.016), (cx + 0.045, my - 0.018)]
        self.part("facial_hair")
        self.pen.polygon(shape, _shade(self.facial, 0.5))
        self.pen.line(shape, _shade(self.facial, 0.6), 0.006, closed=True)

    def mouth(self) -> None:
        p, cx, my, e = self.pen, self.cx, self.mouth_y, self.expression
        lipstick = self.on("lipstick")
        lip = LIPSTICK if lipstick else _mix(self.skin, (140, 50, 55), 0.5)
        width = 0.03 if lipstick else 0.016
        mw = 0.065
        self.part("mouth")
        if lipstick:  # full red lips behind whatever shape the expression gives
            p.ellipse(cx, my + 0.004, mw * 1.05, 0.034, LIPSTICK)
        if e == "happy":
            smile = _arc(cx, my - 0.012, mw, 0.05, 0.0, math.pi, 16)
            p.polygon(smile, (90, 20, 30))
            p.polygon(_arc(cx, my - 0.012, mw * 0.92, 0.018, 0.0, math.pi, 12), (250, 250, 250))
            p.line(smile, lip, width * 0.8, closed=True)
        elif e == "surprised":
            ring = _arc(cx, my + 0.008, 0.028, 0.04, 0.0, 2 * math.pi, 20)
            p.polygon(ring, (70, 15, 25))
            p.line(ring, lip, width * 0.9, closed=True)
        elif e == "sad":
            p.line(
                [(cx + mw * t, my + 0.014 - 0.03 * (1 - t * t)) for t in np.linspace(-1, 1, 9)], lip, width
            )
        elif e == "angry":
            p.line([(cx + mw * 0.7 * t, my + 0.008 * t * t) for t in np.linspace(-1, 1, 7)], lip, width * 1.1)
        else:
            p.line([(cx - mw, my), (cx + mw, my)], lip, width)

    def glasses(self) -> None:
        sunglasses, eyeglasses = self.on("sunglasses"), self.on("eyeglasses")
        if not (sunglasses or eyeglasses):
            return
        p, cx, ey, w = self.pen, self.cx, self.eye_y, self.w
        frame = tuple(self.style.get("frame_color", (20, 20, 24)))
        square = self.style.get("glasses_shape") == "square"
        r = 0.07 if sunglasses else 0.064
        self.part("glasses")
        lenses = []
        for side in (-1, 1):
            x = cx + side * 0.088
            lenses.append(
                _superellipse(x, ey, r * 1.08, r * 0.78)
                if square
                else _arc(x, ey, r, r * 0.92, 0, 2 * math.pi, 28)[:-1]
            )
        for side, lens in zip((-1, 1), lenses, strict=True):
            x = cx + side * 0.088
            if sunglasses:
                p.polygon(lens, (24, 24, 30))
                p.line([(x - r * 0.45, ey - r * 0.2), (x - r * 0.1, ey - r * 0.55)], (110, 110, 130), 0.012)
            else:
                p.line([(x + r * 0.2, ey - r * 0.6), (x + r * 0.55, ey - r * 0.25)], (255, 255, 255), 0.008)
            p.line(lens, frame, 0.022 if eyeglasses else 0.016, closed=True)
            p.line([(x + side * r, ey - 0.01), (cx + side * w * 0.99, ey)], frame, 0.014)
        p.line([(cx - 0.088 + r, ey - 0.012), (cx, ey - 0.022), (cx + 0.088 - r, ey - 0.012)], frame, 0.016)

    def earrings(self) -> None:
        if not self.on("earrings"):
            return
        p, cx, cy, w = self.pen, self.cx, self.cy, self.w
        color = EARRING_COLORS.get(str(self.style.get("earring_color", "gold")), EARRING_COLORS["gold"])
        self.part("earring")
        for side in (-1, 1):
            x = cx + side * w * 1.0
            p.dot(x, cy + 0.08, 0.014, color)
            p.dot(x, cy + 0.125, 0.044, _shade(color, 0.35))
            p.dot(x, cy + 0.125, 0.034, color)

    def hat(self) -> None:
        if not self.on("hat"):
            return
        p, cx, w = self.pen, self.cx, self.w
        color = tuple(self.style.get("hat_color", (200, 30, 40)))
        dark = _shade(color, 0.6)
        brim_y = self.hairline - 0.01
        kind = self.style.get("hat_style", "fedora")
        self.part("hat")
        if kind == "cap":
            p.polygon(_arc(cx, brim_y, w * 1.13, 0.21, math.pi, 2 * math.pi), color)
            p.ellipse(cx, brim_y + 0.012, w * 1.0, 0.045, dark)
            p.dot(cx, brim_y - 0.205, 0.02, dark)
        elif kind == "beanie":
            p.polygon(_arc(cx, brim_y + 0.01, w * 1.12, 0.22, math.pi, 2 * math.pi), color)
            p.polygon(
                [
                    (cx - w * 1.15, brim_y - 0.04),
                    (cx + w * 1.15, brim_y - 0.04),
                    (cx + w * 1.15, brim_y + 0.025),
                    (cx - w * 1.15, brim_y + 0.025),
                ],
                dark,
            )
            p.dot(cx, brim_y - 0.215, 0.04, dark)
        else:
            crown = [
                (cx - w * 1.08, brim_y),
                (cx - w * 0.9, brim_y - 0.19),
                (cx - w * 0.3, brim_y - 0.2),
                (cx, brim_y - 0.17),
                (cx + w * 0.3, brim_y - 0.2),
                (cx + w * 0.9, brim_y - 0.19),
                (cx + w * 1.08, brim_y),
            ]
            p.polygon(crown, color)
            p.polygon(
                [
                    (cx - w * 1.06, brim_y - 0.04),
                    (cx + w * 1.06, brim_y - 0.04),
                    (cx + w * 1.08, brim_y),
                    (cx - w * 1.08, brim_y),
                ],
                dark,
            )
            p.ellipse(cx, brim_y, w * 1.7, 0.042, color)
            p.line(_arc(cx, brim_y, w * 1.7, 0.042, 0, math.pi, 16), dark, 0.008)

    def landmarks(self) -> list[Point]:
        """`LANDMARKS` in the layout's unit square, where the shapes above put them: eye and brow
        centres, the nose's lowest point, the ends of the mouth as the expression draws it, the
        bottom of the face outline."""
        cx, cy, ey, my, e = self.cx, self.cy, self.eye_y, self.mouth_y, self.expression
        brow_y = ey - 0.055 + {"happy": -0.012, "sad": -0.008, "surprised": -0.045}.get(e, 0.0)
        half_width, end_y = {
            "happy": (0.065, my - 0.012),
            "surprised": (0.028, my + 0.008),
            "sad": (0.065, my + 0.014),
            "angry": (0.0455, my + 0.008),
        }.get(e, (0.065, my))
        return [
            (cx - 0.085, ey),
            (cx + 0.085, ey),
            (cx - 0.088, brow_y),
            (cx + 0.088, brow_y),
            (cx + 0.012, cy + 0.09),
            (cx - half_width, end_y),
            (cx + half_width, end_y),
            (cx, cy + self.h),
        ]


@dataclass(frozen=True)
class RenderedFace:
    """`render_face_parts`' output: the image, its part mask (uint8 [size, size], ids into
    `PART_CLASSES`) and `LANDMARKS` as (x, y) in output pixels (0..size across the image)."""

    image: Image.Image
    mask: np.ndarray
    points: dict[str, tuple[float, float]]


def render_face(attributes: Mapping[str, object], rng: random.Random, size: int = 112) -> Image.Image:
    """An RGB image of the face the record describes; `rng` only adds pixel noise.

    Missing nuisance keys fall back to a frontal, oval, light-skinned face on grey, so a
    hand-written record with only the semantic attributes renders too.
    """
    return _render(attributes, rng, size, parts=False).image


def render_face_parts(attributes: Mapping[str, object], rng: random.Random, size: int = 112) -> RenderedFace:
    """The image `render_face` draws, with its part mask and landmarks."""
    return _render(attributes, rng, size, parts=True)


def _render(attributes: Mapping[str, object], rng: random.Random, size: int, parts: bool) -> RenderedFace:
    canvas_size = size * SUPERSAMPLE
    bg = _background(attributes.get("background") or {}, size)  # type: ignore[arg-type]
    canvas = Image.fromarray(bg.astype(np.uint8), "RGB").resize((canvas_size, canvas_size), Image.NEAREST)
    labels = Image.new("L", (canvas_size, canvas_size), 0) if parts else None
    pen = _Pen(canvas, attributes.get("pose") or IDENTITY_POSE, labels)  # type: ignore[arg-type]
    face = _Face(attributes, pen)
    face.body()
    face.head()
    face.hair_top()
    face.beard_and_cheeks()
    face.eyes()
    face.nose()
    face.mustache()
    face.mouth()
    face.glasses()
    face.earrings()
    face.hat()
    # reducing_gap: a 2x box reduction first, then LANCZOS: less work, the same look at this size
    small = np.asarray(canvas.resize((size, size), Image.LANCZOS, reducing_gap=2.0), dtype=np.int16)
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    sigma = rng.uniform(1.0, 4.0)
    noisy = small + np.rint(noise_rng.standard_normal(small.shape, dtype=np.float32) * sigma).astype(np.int16)
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    if labels is None:
        return RenderedFace(image, np.zeros((0, 0), np.uint8), {})
    # the label at each output pixel's centre; a canvas pixel's centre is at +0.5 of its index
    mask = np.asarray(labels.resize((size, size), Image.NEAREST), dtype=np.uint8)
    points = {
        name: ((x + 0.5) / SUPERSAMPLE, (y + 0.5) / SUPERSAMPLE)
        for name, (x, y) in zip(LANDMARKS, pen._map(face.landmarks()), strict=True)
    }
    return RenderedFace(image, mask, points)
