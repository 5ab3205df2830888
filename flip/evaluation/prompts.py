"""Prompt ensembles for attribute words a person types ("eyeglasses", "smiling", "blond hair").

A binary question is asked as a positive and a negative prompt set ("a photo of a person
with eyeglasses" vs "... without eyeglasses"), so the answer is a probability. Common face
attributes have phrasings here in the words FaceShapes captions use; any other phrase is
turned into a pair by a rule ("with X" / "without X", "wearing X" / "not wearing X"), and a
benchmark or a user can always give explicit phrases instead (YAML).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a person {}.",
    "a close-up photo of a face {}.",
    "a person {}.",
)

# name -> (positive phrases, negative phrases); names are lower case with spaces
BINARY_PHRASES: dict[str, tuple[list[str], list[str]]] = {
    "eyeglasses": (["with eyeglasses", "wearing glasses"], ["without eyeglasses", "without glasses"]),
    "sunglasses": (["wearing sunglasses"], ["without sunglasses", "not wearing sunglasses"]),
    "hat": (["wearing a hat"], ["without a hat", "with no hat"]),
    "beard": (["with a beard"], ["without a beard", "clean-shaven"]),
    "mustache": (["with a mustache"], ["without a mustache"]),
    "earrings": (["wearing earrings"], ["without earrings", "not wearing earrings"]),
    "bangs": (["with bangs"], ["without bangs"]),
    "long hair": (["with long hair"], ["with short hair"]),
    "bald": (["who is bald", "with a bald head"], ["with hair on the head", "who is not bald"]),
    "lipstick": (["wearing lipstick"], ["without lipstick", "not wearing lipstick"]),
    "rosy cheeks": (["with rosy cheeks"], ["without rosy cheeks"]),
    "smiling": (["who is smiling", "with a big smile"], ["who is not smiling", "with a straight face"]),
    "young": (["who is young"], ["who is old"]),
    "male": (["who is a man"], ["who is a woman"]),
}
ALIASES: dict[str, str] = {
    "glasses": "eyeglasses",
    "spectacles": "eyeglasses",
    "wearing hat": "hat",
    "wearing a hat": "hat",
    "moustache": "mustache",
    "wearing earrings": "earrings",
    "wearing lipstick": "lipstick",
    "smile": "smiling",
    "man": "male",
}
# choice -> phrases, for multi-class questions (expressions, hair colours)
CHOICE_PHRASES: dict[str, list[str]] = {
    "neutral": ["with a neutral expression"],
    "happy": ["who is smiling", "who looks happy"],
    "happiness": ["who is smiling", "who looks happy"],
    "sad": ["who looks sad"],
    "sadness": ["who looks sad"],
    "surprised": ["who looks surprised"],
    "surprise": ["who looks surprised"],
    "angry": ["who looks angry"],
    "anger": ["who looks angry"],
    "fear": ["who looks afraid"],
    "disgust": ["who looks disgusted"],
    "contempt": ["who looks contemptuous"],
}
_LEADING = ("with ", "without ", "wearing ", "not ", "who ", "looking ", "having ")


def normalize(name: str) -> str:
    """'Wearing_Hat', 'long-hair ' -> 'wearing hat', 'long hair'."""
    return re.sub(r"[\s_]+", " ", name.replace("-", " ")).strip().lower()


def binary_prompts(name: str) -> dict[str, list[str]]:
    """{positive: [...], negative: [...]} phrases for an attribute name or free phrase."""
    key = normalize(name)
    key = ALIASES.get(key, key)
    if key in BINARY_PHRASES:
        positive, negative = BINARY_PHRASES[key]
        return {"positive": list(positive), "negative": list(negative)}
    if key.endswith(" hair") and key.split()[0] in {
        "black",
        "brown",
        "blond",
        "blonde",
        "red",
        "gray",
        "grey",
    }:
        return {"positive": [f"with {key}"], "negative": [f"without {key}"]}
    if key.startswith("with "):
        return {"positive": [key], "negative": ["without " + key[5:]]}
    if key.startswith("wearing "):
        return {"positive": [key], "negative": ["not " + key, "without " + key[8:]]}
    if key.startswith("who is "):
        return {"positive": [key], "negative": ["who is not " + key[7:]]}
    if key.startswith(_LEADING):
        return {"positive": [key], "negative": ["not " + key]}
    return {"positive": [f"with {key}"], "negative": [f"without {key}"]}


def choice_prompts(name: str) -> list[str]:
    """Phrases for one answer of a multi-class question ('happy', 'blond hair', 'who is smiling')."""
    key = normalize(name)
    if key in CHOICE_PHRASES:
        return list(CHOICE_PHRASES[key])
    if key.endswith(" hair"):
        return [f"with {key}"]
    if key.startswith(_LEADING):
        return [key]
    return [f"who looks {key}"]


def _phrases(where: str, phrases: Sequence[str]) -> list[str]:
    """Given phrases as a list; an empty list or a blank phrase would ask about the template alone."""
    listed = [phrases] if isinstance(phrases, str) else list(phrases)
    if not listed or any(not isinstance(p, str) or not p.strip() for p in listed):
        raise ValueError(
            f"prompts for {where!r} must be a non-empty list of non-blank phrases, got {phrases!r}"
        )
    return listed


def resolve_binary(
    names: Sequence[str], given: Mapping[str, Mapping[str, Sequence[str]]] | None = None
) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """Prompts for each attribute: the given ones, else the built-in rule; also which fell back."""
    given = given or {}
    out, fallback = {}, []
    for name in names:
        if name in given:
            out[name] = {side: _phrases(f"{name}.{side}", phrases) for side, phrases in given[name].items()}
        else:
            out[name] = binary_prompts(name)
            fallback.append(name)
    return out, fallback


def resolve_choices(
    names: Sequence[str], given: Mapping[str, Sequence[str]] | None = None
) -> tuple[dict[str, list[str]], list[str]]:
    """Phrases for each class, given or built in (in the order of `names`); also which fell back."""
    given = given or {}
    out, fallback = {}, []
    for name in names:
        if name in given:
            out[name] = _phrases(name, given[name])
        else:
            out[name] = choice_prompts(name)
            fallback.append(name)
    return out, fallback
