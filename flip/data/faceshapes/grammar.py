"""The caption grammar for FaceShapes, as plain data for `flip.data.captions.CaptionGrammar`.

The plain phrasings of the zero-shot prompts ("with eyeglasses", "without a hat", "who is
bald", "who looks sad", ...) are all in here, so that evaluation asks in the words training
used; the other phrasings add enough variety that the text tower has to read the attribute
words rather than memorise whole captions. Negative phrasings that only make sense with hair
("with short hair", "without bangs") are limited to records that are not bald.

The small attributes (eyeglasses, mustache, earrings, bangs, lipstick, rosy cheeks) are named
for 95% of the faces that have them and denied for only 8% of the others; the obvious ones keep
the defaults (70% / 22%). A young text tower reads a caption as a bag of words, and "mustache"
occurs in "with a mustache" and "with no mustache" alike: at the defaults 63% of the captions
holding the word come with a mustache (35% of all faces have one), at 95/8 87%. The images were
never the problem (a supervised tiny ViT learns mustache and earrings quickly); the contrastive
signal was. Naming the obvious ones less often instead cost them their zero-shot accuracy. The
scores before and after: docs/data.md, "Why FaceShapes looks the way it does".
"""

from __future__ import annotations

from typing import Any

__all__ = ["FACESHAPES_GRAMMAR"]

_HAS_HAIR = {"bald": False}
# named for nearly every face that has them, rarely denied (see the module docstring)
_SMALL_ATTRIBUTE_RATES = {"mention_prob": 0.95, "negative_prob": 0.08}

FACESHAPES_GRAMMAR: dict[str, Any] = {
    "nouns": ["person", "person", "person", "person", "face", "face", "individual"],
    "np_frames": [
        "a photo of {np}",
        "a photo of {np}",
        "a photo of {np}",
        "a close-up photo of {np}",
        "a close-up photo of {np}",
        "{np}",
        "{np}",
        "a portrait of {np}",
        "an image of {np}",
        "a picture of {np}",
        "a headshot of {np}",
        "a drawing of {np}",
        "a cartoon of {np}",
    ],
    "clause_subjects": ["this person", "this person", "the person", "the subject", "this individual"],
    "one_sentence_prob": 0.55,
    "clause_first_prob": 0.2,
    "adjective_prob": 0.35,
    "max_adjectives": 2,
    "min_mentions": 2,
    "max_mentions": 7,
    "max_words": 36,
    "mention_prob": 0.7,
    "negative_prob": 0.22,
    "attributes": {
        "eyeglasses": {
            "kind": "binary",
            **_SMALL_ATTRIBUTE_RATES,
            "positive": ["with eyeglasses", "wearing eyeglasses", "with glasses", "wearing glasses"],
            "negative": [
                "without eyeglasses",
                "without eyeglasses",
                # "glasses" would also deny the sunglasses someone may be wearing
                {"text": "without glasses", "when": {"sunglasses": False}},
                {"text": "not wearing glasses", "when": {"sunglasses": False}},
                {"text": "with no glasses", "when": {"sunglasses": False}},
            ],
        },
        "sunglasses": {
            "kind": "binary",
            "positive": [
                "wearing sunglasses",
                "with sunglasses",
                "with dark sunglasses",
                "wearing dark shades",
            ],
            "negative": ["without sunglasses", "not wearing sunglasses", "with no sunglasses"],
        },
        "hat": {
            "kind": "binary",
            "positive": ["wearing a hat", "wearing a hat", "with a hat", "with a hat on"],
            "negative": {
                "phrases": ["without a hat", "with no hat", "not wearing a hat"],
                "adjectives": ["bareheaded"],
            },
        },
        "beard": {
            "kind": "binary",
            "positive": {"phrases": ["with a beard", "with a full beard"], "adjectives": ["bearded"]},
            "negative": {
                "phrases": ["without a beard", "with no beard"],
                "adjectives": [{"text": "clean-shaven", "when": {"mustache": False}}],
            },
        },
        "mustache": {
            "kind": "binary",
            **_SMALL_ATTRIBUTE_RATES,
            "positive": ["with a mustache", "with a moustache", "with a thick mustache"],
            "negative": ["without a mustache", "with no mustache"],
        },
        "earrings": {
            "kind": "binary",
            **_SMALL_ATTRIBUTE_RATES,
            "positive": [
                "wearing earrings",
                "with earrings",
                "with shiny earrings",
                "wearing dangling earrings",
            ],
            "negative": ["without earrings", "not wearing earrings", "with no earrings"],
        },
        "bangs": {
            "kind": "binary",
            **_SMALL_ATTRIBUTE_RATES,
            "positive": ["with bangs", "with a fringe", "with bangs covering the forehead"],
            "negative": [
                {"text": "without bangs", "when": _HAS_HAIR},
                {"text": "with no bangs", "when": _HAS_HAIR},
                {"text": "with an uncovered forehead", "when": {"bald": False, "hat": False}},
            ],
        },
        "long_hair": {
            "kind": "binary",
            "positive": {
                "phrases": ["with long hair", "with shoulder-length hair", "with long flowing hair"],
                "adjectives": ["long-haired"],
            },
            "negative": {
                "phrases": [
                    {"text": "with short hair", "when": _HAS_HAIR},
                    {"text": "with short hair", "when": _HAS_HAIR},
                    {"text": "without long hair", "when": _HAS_HAIR},
                ],
                "adjectives": [{"text": "short-haired", "when": _HAS_HAIR}],
            },
        },
        "bald": {
            "kind": "binary",
            "mention_prob": 0.75,
            "negative_prob": 0.15,
            "positive": {
                "phrases": ["who is bald", "with a bald head", "with a shaved head", "with no hair"],
                "adjectives": ["bald", "bald-headed"],
            },
            "negative": ["with hair on the head", "who is not bald", "with a full head of hair"],
        },
        "lipstick": {
            "kind": "binary",
            **_SMALL_ATTRIBUTE_RATES,
            "positive": ["wearing lipstick", "with red lipstick", "with red lips", "wearing red lipstick"],
            "negative": ["without lipstick", "not wearing lipstick", "with no lipstick"],
        },
        "rosy_cheeks": {
            "kind": "binary",
            **_SMALL_ATTRIBUTE_RATES,
            "positive": {
                "phrases": ["with rosy cheeks", "with pink cheeks", "with blushing cheeks"],
                "adjectives": ["rosy-cheeked"],
            },
            "negative": ["without rosy cheeks", "with no rosy cheeks", "without blush on the cheeks"],
        },
        "hair_color": {
            "kind": "categorical",
            "mention_prob": 0.75,
            "values": {
                "black": {
                    "phrases": ["with black hair", "with jet-black hair"],
                    "adjectives": ["black-haired"],
                },
                "brown": {
                    "phrases": ["with brown hair", "with dark brown hair"],
                    "adjectives": ["brown-haired"],
                },
                "blond": {
                    "phrases": ["with blond hair", "with blonde hair", "with golden blond hair"],
                    "adjectives": ["blond", "blond-haired"],
                },
                "red": {
                    "phrases": ["with red hair", "with ginger hair"],
                    "adjectives": ["red-haired", "redheaded"],
                },
                "gray": {
                    "phrases": ["with gray hair", "with grey hair", "with silver-gray hair"],
                    "adjectives": ["gray-haired", "grey-haired"],
                },
            },
        },
        "expression": {
            "kind": "categorical",
            "mention_prob": 0.75,
            "values": {
                "neutral": {
                    "phrases": [
                        "with a neutral expression",
                        "with a straight face",
                        "with a blank expression",
                    ],
                    "adjectives": ["expressionless"],
                },
                "happy": {
                    "phrases": ["smiling", "who is smiling", "who looks happy", "with a big smile"],
                    "adjectives": ["smiling", "happy", "cheerful"],
                },
                "sad": {
                    "phrases": ["who looks sad", "looking sad", "with a sad face", "with a sad expression"],
                    "adjectives": ["sad", "unhappy"],
                },
                "surprised": {
                    "phrases": [
                        "who looks surprised",
                        "looking surprised",
                        "with a surprised look",
                        "with a surprised expression",
                    ],
                    "adjectives": ["surprised", "astonished"],
                },
                "angry": {
                    "phrases": ["who looks angry", "looking angry", "frowning", "with an angry frown"],
                    "adjectives": ["angry", "annoyed"],
                },
            },
        },
    },
}
