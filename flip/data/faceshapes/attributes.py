"""The FaceShapes attribute model: what a face has, and the nuisance factors it is drawn with.

Rates are chosen so every binary attribute is positive 25-50% of the time: zero-shot
evaluation uses balanced accuracy, and a model only learns "without X" if it sees plenty of
both. Attributes are independent except where physics forbids (sunglasses over eyeglasses,
bald with bangs), so captions cannot be solved by shortcuts between attributes.
Nuisance factors (face shape, skin, background, pose, colours) are sampled here too, so that
the record alone fixes the drawing and is stored with each sample.
"""

from __future__ import annotations

import colorsys
import random

__all__ = [
    "BINARY_ATTRIBUTES",
    "FACE_SHAPES",
    "HAIR_RGB",
    "MULTICLASS_ATTRIBUTES",
    "SKIN_TONES",
    "sample_attributes",
]

BINARY_ATTRIBUTES = (
    "eyeglasses",
    "sunglasses",
    "hat",
    "beard",
    "mustache",
    "earrings",
    "bangs",
    "long_hair",
    "bald",
    "lipstick",
    "rosy_cheeks",
)
MULTICLASS_ATTRIBUTES = {
    "hair_color": ("black", "brown", "blond", "red", "gray"),
    "expression": ("neutral", "happy", "sad", "surprised", "angry"),
}
FACE_SHAPES = ("round", "oval", "long")
SKIN_TONES = {
    "porcelain": (250, 226, 206),
    "light": (238, 198, 164),
    "beige": (222, 174, 128),
    "tan": (196, 138, 92),
    "brown": (150, 98, 62),
    "dark": (102, 66, 44),
}
HAIR_RGB = {
    "black": (28, 24, 24),
    "brown": (104, 62, 30),
    "blond": (232, 196, 96),
    "red": (184, 62, 24),
    "gray": (168, 168, 174),
}

# marginal rates; conditional ones are derived so the *overall* rate is the one named
BALD_RATE = 0.25
GLASSES_RATE = 0.3  # eyeglasses and sunglasses each; the two exclude each other
RATES = {
    "hat": 0.3,
    "beard": 0.35,
    "mustache": 0.35,
    "earrings": 0.35,
    "bangs": 0.33,
    "long_hair": 0.35,
    "lipstick": 0.35,
    "rosy_cheeks": 0.35,
}
HAIR_DEPENDENT = ("hat", "bangs", "long_hair")  # impossible (or pointless) on a bald head

HAT_COLORS = ((200, 30, 40), (30, 70, 180), (30, 140, 60), (120, 40, 150), (230, 130, 20), (40, 40, 48))
FRAME_COLORS = ((20, 20, 24), (70, 40, 20), (20, 30, 90), (120, 20, 30))
# saturated colours that no hair or skin shares, so blond or grey hair beside the ear does not
# look like an earring (as gold and silver drops did at 64 px)
EARRING_COLORS = {"gold": (255, 200, 0), "turquoise": (0, 205, 215)}


def _random_color(rng: random.Random, sat: tuple[float, float], val: tuple[float, float]) -> list[int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return [round(r * 255), round(g * 255), round(b * 255)]


def _style(rng: random.Random) -> dict:
    """Looks of the accessories, decided up front so the record reproduces the drawing."""
    return {
        "glasses_shape": rng.choice(("round", "square")),
        "frame_color": list(rng.choice(FRAME_COLORS)),
        "hat_style": rng.choice(("fedora", "cap", "beanie")),
        "hat_color": list(rng.choice(HAT_COLORS)),
        "earring_color": rng.choice(tuple(EARRING_COLORS)),
        "facial_hair_color": rng.choice(("black", "brown", "gray")),  # used when the head is bald
        "eye_color": rng.choice(("dark", "blue", "green", "brown")),
        "shirt_color": _random_color(rng, (0.2, 0.8), (0.3, 0.9)),
    }


def sample_attributes(rng: random.Random) -> dict:
    """One face record: the semantic attributes plus nuisance factors, JSON-serialisable."""
    bald = rng.random() < BALD_RATE
    glasses = rng.random()
    record: dict = {
        "eyeglasses": glasses < GLASSES_RATE,
        "sunglasses": GLASSES_RATE <= glasses < 2 * GLASSES_RATE,
    }
    for name in [n for n in BINARY_ATTRIBUTES if n not in record]:  # fixed order: the RNG draws depend on it
        if name == "bald":
            record[name] = bald
        elif name in HAIR_DEPENDENT:
            record[name] = not bald and rng.random() < RATES[name] / (1.0 - BALD_RATE)
        else:
            record[name] = rng.random() < RATES[name]
    record["hair_color"] = None if bald else rng.choice(MULTICLASS_ATTRIBUTES["hair_color"])
    record["expression"] = rng.choice(MULTICLASS_ATTRIBUTES["expression"])
    record["face_shape"] = rng.choice(FACE_SHAPES)
    record["skin_tone"] = rng.choice(tuple(SKIN_TONES))
    gradient = rng.random() < 0.5
    record["background"] = {
        "kind": "gradient" if gradient else "solid",
        "color": _random_color(rng, (0.0, 0.6), (0.25, 0.95)),
        "color2": _random_color(rng, (0.0, 0.6), (0.25, 0.95)) if gradient else None,
        "direction": rng.choice(("vertical", "horizontal", "diagonal")) if gradient else None,
    }
    record["pose"] = {
        "angle": round(rng.uniform(-15.0, 15.0), 3),
        "scale": round(rng.uniform(0.85, 1.1), 4),
        "dx": round(rng.uniform(-0.06, 0.06), 4),
        "dy": round(rng.uniform(-0.06, 0.06), 4),
    }
    record["style"] = _style(rng)
    return record
