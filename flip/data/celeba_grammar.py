"""A caption grammar over CelebA's 40 attributes, as data for `flip.data.captions.CaptionGrammar`.

It turns an attribute dataset into face-caption pretraining data, as MM-CelebA-HQ and
CelebA-Dialog did, with the same engine and conventions as the FaceShapes captions. Only
statements the labels support are made: an absent attribute is stated negatively only where
the negation is exact ("without eyeglasses", "with the mouth closed"), never where it is
not ("without big lips" would not mean "with small lips"), so those have no negative
phrases. `Male` is never mentioned as a word of its own; it picks the noun ("man", "woman")
and pronoun instead. `No_Beard` is inverted: its positive value is the absence of a beard.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CELEBA_GRAMMAR"]

_MAN = {"Male": True}
_WOMAN = {"Male": False}
_HAS_HAIR = {"Bald": False}


def _binary(positive: Any, negative: Any = (), mention: float = 0.6, negative_prob: float = 0.0) -> dict:
    return {
        "kind": "binary",
        "positive": positive,
        "negative": list(negative) if isinstance(negative, list | tuple) else negative,
        "mention_prob": mention,
        "negative_prob": negative_prob,
    }


CELEBA_GRAMMAR: dict[str, Any] = {
    "nouns": [
        "person",
        "person",
        "face",
        {"text": "man", "when": _MAN},
        {"text": "man", "when": _MAN},
        {"text": "gentleman", "when": _MAN},
        {"text": "woman", "when": _WOMAN},
        {"text": "woman", "when": _WOMAN},
        {"text": "lady", "when": _WOMAN},
    ],
    "np_frames": [
        "a photo of {np}",
        "a photo of {np}",
        "a close-up photo of {np}",
        "a portrait of {np}",
        "a headshot of {np}",
        "an image of {np}",
        "{np}",
    ],
    "clause_subjects": [
        "this person",
        "the person",
        {"text": "he", "when": _MAN},
        {"text": "this man", "when": _MAN},
        {"text": "she", "when": _WOMAN},
        {"text": "this woman", "when": _WOMAN},
    ],
    "one_sentence_prob": 0.5,
    "clause_first_prob": 0.15,
    "adjective_prob": 0.35,
    "max_adjectives": 2,
    "min_mentions": 2,
    "max_mentions": 7,
    "max_words": 40,
    "attributes": {
        "5_o_Clock_Shadow": _binary(
            {
                "phrases": ["with a five o'clock shadow", "with stubble", "with light stubble"],
                "adjectives": ["stubbly"],
            },
        ),
        "Arched_Eyebrows": _binary(["with arched eyebrows", "with high-arched eyebrows"], mention=0.5),
        "Attractive": _binary({"phrases": ["who is attractive"], "adjectives": ["attractive"]}, mention=0.3),
        "Bags_Under_Eyes": _binary(
            ["with bags under the eyes", "with puffy eyes"], ["without bags under the eyes"], 0.5, 0.05
        ),
        "Bald": _binary(
            {"phrases": ["who is bald", "with a bald head", "with a shaved head"], "adjectives": ["bald"]},
            ["who is not bald", "with hair on the head"],
            0.8,
            0.05,
        ),
        "Bangs": _binary(
            ["with bangs", "with a fringe", "with bangs covering the forehead"],
            [{"text": "without bangs", "when": _HAS_HAIR}],
            0.7,
            0.1,
        ),
        "Big_Lips": _binary(
            {"phrases": ["with big lips", "with full lips"], "adjectives": ["full-lipped"]}, mention=0.5
        ),
        "Big_Nose": _binary(["with a big nose", "with a large nose"], mention=0.5),
        "Black_Hair": _binary(
            {"phrases": ["with black hair", "with dark black hair"], "adjectives": ["black-haired"]},
            mention=0.7,
        ),
        "Blond_Hair": _binary(
            {"phrases": ["with blond hair", "with blonde hair"], "adjectives": ["blond", "blond-haired"]},
            mention=0.7,
        ),
        "Blurry": _binary(["who is out of focus", "who appears blurry"], mention=0.4),
        "Brown_Hair": _binary({"phrases": ["with brown hair"], "adjectives": ["brown-haired"]}, mention=0.7),
        "Bushy_Eyebrows": _binary(["with bushy eyebrows", "with thick eyebrows"], mention=0.5),
        "Chubby": _binary({"phrases": ["with a chubby face"], "adjectives": ["chubby"]}, mention=0.5),
        "Double_Chin": _binary(["with a double chin"], ["without a double chin"], 0.6, 0.03),
        "Eyeglasses": _binary(
            ["with eyeglasses", "wearing eyeglasses", "with glasses", "wearing glasses"],
            ["without eyeglasses", "without glasses", "not wearing glasses"],
            0.85,
            0.15,
        ),
        "Goatee": _binary(["with a goatee"], [{"text": "without a goatee", "when": _MAN}], 0.7, 0.05),
        "Gray_Hair": _binary(
            {"phrases": ["with gray hair", "with grey hair"], "adjectives": ["gray-haired"]}, mention=0.7
        ),
        "Heavy_Makeup": _binary(
            ["wearing heavy makeup", "with heavy makeup"], ["without heavy makeup"], 0.6, 0.05
        ),
        "High_Cheekbones": _binary(["with high cheekbones"], mention=0.5),
        "Male": _binary(["who is male"], ["who is female"], 0.0, 0.0),  # said by the noun instead
        "Mouth_Slightly_Open": _binary(
            ["with the mouth slightly open", "with slightly parted lips"],
            ["with the mouth closed", "with a closed mouth"],
            0.5,
            0.1,
        ),
        "Mustache": _binary(
            ["with a mustache", "with a moustache"], [{"text": "without a mustache", "when": _MAN}], 0.8, 0.1
        ),
        "Narrow_Eyes": _binary({"phrases": ["with narrow eyes"], "adjectives": ["narrow-eyed"]}, mention=0.5),
        "No_Beard": _binary(  # positive = no beard (the common case), negative = a beard
            {
                "phrases": [
                    {"text": "without a beard", "when": _MAN},
                    {"text": "with no beard", "when": _MAN},
                ],
                "adjectives": [
                    {
                        "text": "clean-shaven",
                        "when": {"Male": True, "Mustache": False, "Goatee": False, "5_o_Clock_Shadow": False},
                    }
                ],
            },
            {"phrases": ["with a beard", "with a full beard"], "adjectives": ["bearded"]},
            0.15,
            0.85,
        ),
        "Oval_Face": _binary({"phrases": ["with an oval face"], "adjectives": ["oval-faced"]}, mention=0.4),
        "Pale_Skin": _binary({"phrases": ["with pale skin"], "adjectives": ["pale-skinned"]}, mention=0.6),
        "Pointy_Nose": _binary(["with a pointy nose", "with a pointed nose"], mention=0.5),
        "Receding_Hairline": _binary(["with a receding hairline"], mention=0.7),
        "Rosy_Cheeks": _binary(
            {"phrases": ["with rosy cheeks"], "adjectives": ["rosy-cheeked"]},
            ["without rosy cheeks"],
            0.7,
            0.05,
        ),
        "Sideburns": _binary(["with sideburns", "with long sideburns"], mention=0.6),
        "Smiling": _binary(
            {"phrases": ["smiling", "who is smiling", "with a smile"], "adjectives": ["smiling"]},
            ["who is not smiling", "not smiling"],
            0.75,
            0.3,
        ),
        "Straight_Hair": _binary(
            {"phrases": ["with straight hair"], "adjectives": ["straight-haired"]}, mention=0.5
        ),
        "Wavy_Hair": _binary({"phrases": ["with wavy hair"], "adjectives": ["wavy-haired"]}, mention=0.6),
        "Wearing_Earrings": _binary(
            ["wearing earrings", "with earrings"], ["without earrings", "not wearing earrings"], 0.75, 0.1
        ),
        "Wearing_Hat": _binary(
            ["wearing a hat", "with a hat"], ["without a hat", "not wearing a hat"], 0.85, 0.1
        ),
        "Wearing_Lipstick": _binary(
            ["wearing lipstick", "with lipstick on"], ["without lipstick", "not wearing lipstick"], 0.7, 0.1
        ),
        "Wearing_Necklace": _binary(
            ["wearing a necklace", "with a necklace"], ["without a necklace"], 0.7, 0.05
        ),
        "Wearing_Necktie": _binary(
            ["wearing a necktie", "wearing a tie"], ["without a tie", "not wearing a tie"], 0.8, 0.05
        ),
        "Young": _binary(
            {"phrases": ["who looks young"], "adjectives": ["young"]},
            {"phrases": ["who looks older"], "adjectives": ["older", "middle-aged"]},
            0.5,
            0.5,
        ),
    },
}
