"""`data.captions`: which of a sample's several captions it trains on at this step.

A FaceCaption-15M shard written by flip-data holds the face caption (`.txt`, and `caption` in
the `.json`) and, when the parquet has it, the original LAION caption (`laion_caption`);
MM-CelebA-HQ gives ten captions per face, one per line of the `.txt` or as a list in the
`.json`. Training on one caption per face (today's default, `data.captions: null`) wastes the
others; sampling a field per step with set probabilities (`fields: {caption: 0.7,
laion_caption: 0.3}`) shows the model every caption over the epochs, and splitting a long
caption into sentences and taking one per step (`sentences: one`, as DreamLIP does with
long synthetic captions) gives short, single-claim positives.

A field is the `.txt` member (`txt`: each non-empty line a caption) or a top-level key of the
`.json` (a string, one caption per non-empty line, or a list of strings). A sample without
the chosen field falls back to its other fields, drawn by their probabilities; a sample with
none of them is skipped and counted as `missing_caption`.

Each sample's draw comes from a generator seeded by its `__seed__` (its place in the training
stream, `SkipConsumed`), as the foils' is, so a resumed run trains on the same captions as the
run it continues.

Several positives per image at once (multi-positive: each image scored against all its
sentences in one step) is not built: every loss (CLIP, SigLIP, FILIP, momentum ITC with its
queues, the foils' extra negatives) assumes one caption per image and a one-hot target per
row, and a batch of variable caption counts changes what the distributed gathers exchange.
One caption per image per step, drawn anew each step, keeps every loss as it is.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flip.data.foils import stable_seed
from flip.data.shards import SampleError

__all__ = ["SENTENCE_MODES", "TXT_FIELD", "CaptionSampler", "caption_sampler", "split_sentences"]

TXT_FIELD = "txt"
SENTENCE_MODES = (None, "one")
_KEYS = ("fields", "sentences")

# words ending in "." that end no sentence: titles, Latin and other common abbreviations
ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "approx", "fig"}
    | {"inc", "ltd", "co", "mt", "ft", "cf", "al"}
)
# a sentence ends at ".", "!" or "?" (and closing quotes or brackets) followed by white space
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def split_sentences(text: str) -> list[str]:
    """The sentences of a caption, by a plain rule: one ends at ".", "!" or "?" followed by white
    space (a decimal such as "1.5" has none, so it stays whole), unless the word before the "."
    is an abbreviation in `ABBREVIATIONS` ("Mr.", "e.g.") or a single letter (an initial, "J.").
    Line breaks end sentences too. Empty pieces are dropped."""
    sentences: list[str] = []
    for line in text.splitlines():
        current, start = "", 0
        for match in _BOUNDARY.finditer(line):
            piece = line[start : match.end()]
            start = match.end()
            words = piece.split()
            last = words[-1].rstrip("\"')]") if words else ""
            if last.endswith(".") and (last[:-1].lower() in ABBREVIATIONS or len(last[:-1]) == 1):
                current += piece
                continue
            current += piece
            sentences.append(current.strip())
            current = ""
        current += line[start:]
        if current.strip():
            sentences.append(current.strip())
    return [s for s in sentences if s]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass
class CaptionSampler:
    """Draws one caption per sample and step from its fields (see the module docstring); picklable."""

    fields: Mapping[str, float]
    sentences: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.fields, Mapping) or not self.fields:
            raise ValueError(
                f"data.captions.fields={self.fields!r}; accepted: a mapping from a field ('txt' for the "
                f".txt, or a .json key) to its probability, e.g. {{caption: 0.7, laion_caption: 0.3}}"
            )
        for name, weight in self.fields.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
                raise ValueError(
                    f"data.captions.fields.{name}={weight!r}; accepted: a probability >= 0 (the "
                    f"probabilities are relative: they need not sum to 1)"
                )
        if not sum(self.fields.values()) > 0:
            raise ValueError(
                f"data.captions.fields={dict(self.fields)}: at least one probability must be > 0"
            )
        if self.sentences not in SENTENCE_MODES:
            multi = " (several positives per image are not built: flip/data/caption_fields.py says why)"
            raise ValueError(
                f"data.captions.sentences={self.sentences!r}; accepted: null (the whole caption) or 'one' "
                f"(one sentence per step){multi if self.sentences == 'all' else ''}"
            )
        self.fields = {str(k): float(v) for k, v in self.fields.items()}

    @property
    def needs_json(self) -> bool:
        return any(name != TXT_FIELD for name in self.fields)

    def captions_of(self, sample: Mapping[str, Any], name: str) -> list[str]:
        """The captions a sample has in one field (empty when it has none)."""
        if name == TXT_FIELD:
            value = sample.get("text")
        else:
            record = sample.get("json")
            value = record.get(name) if isinstance(record, Mapping) else None
        if isinstance(value, str):
            return _lines(value)
        if isinstance(value, list):
            return [line for item in value if isinstance(item, str) for line in _lines(item)]
        return []

    def rng_for(self, sample: Mapping[str, Any]) -> random.Random:
        seed = sample.get("__seed__")
        if seed is None:
            return random.Random(
                stable_seed("captions", self.seed, sample.get("__key__", ""), sample.get("text", ""))
            )
        return random.Random(stable_seed("captions", self.seed, seed))

    def __call__(self, sample: Mapping[str, Any]) -> str:
        """This step's caption of one decoded sample ({"text", "json"?, "__seed__"?})."""
        present = {
            name: found
            for name, weight in self.fields.items()
            if weight > 0 and (found := self.captions_of(sample, name))
        }
        if not present:
            record = sample.get("json")
            keys = sorted(record) if isinstance(record, Mapping) else "no .json"
            raise SampleError(
                "missing_caption",
                f"the sample has none of the caption fields {list(self.fields)} (data.captions.fields); "
                f".json keys: {keys}",
            )
        rng = self.rng_for(sample)
        names = list(present)
        name = rng.choices(names, weights=[self.fields[n] for n in names])[0]
        caption = rng.choice(present[name])
        if self.sentences == "one":
            caption = rng.choice(split_sentences(caption) or [caption])
        return caption


def caption_sampler(config: Mapping[str, Any] | None, seed: int = 0) -> CaptionSampler | None:
    """The CaptionSampler of a `data.captions` value: null (the `.txt` as it is) or a mapping with
    `fields` and `sentences`."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise ValueError(
            f"data.captions={config!r}; accepted: null (the .txt as it is) or a mapping with keys "
            f"{', '.join(_KEYS)}, e.g. {{fields: {{caption: 0.7, laion_caption: 0.3}}, sentences: one}}"
        )
    unknown = sorted(set(config) - set(_KEYS))
    if unknown:
        raise ValueError(f"data.captions has unknown key(s) {unknown}; accepted: {', '.join(_KEYS)}")
    return CaptionSampler(
        fields=config.get("fields", {TXT_FIELD: 1.0}), sentences=config.get("sentences"), seed=seed
    )
