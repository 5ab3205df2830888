"""Sample keys: unique for distinct inputs, the same on every run, and valid webdataset keys.

A webdataset key names every member of a sample (`{key}.jpg`, `{key}.txt`), so it cannot hold
a dot (the reader splits the extension at the first one) and is kept to `[A-Za-z0-9_-]`.
Turning a file name into such a key loses information (`a b.jpg` and `a_b.jpg`, `张三.jpg` and
`李四.jpg`, `x/y.jpg` and `x_y.jpg` would all meet), and a lost sample is silent data loss.
So a key is its text unchanged when that text is already safe, and otherwise a readable
safe form plus a short hash of the whole original: two inputs can only share a key when the
inputs are equal. The hash depends on the input alone, so keys are stable across runs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

__all__ = ["KEY_PATTERN", "disambiguate", "safe_key", "stable_hash"]

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
HASH_CHARS = 8
_READABLE_CHARS = 80  # the readable part is only a hint; the hash makes the key unique


def stable_hash(text: str) -> str:
    """`HASH_CHARS` hex digits of SHA-256: the same for the same text in every process and run."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def safe_key(text: str, identity: str | None = None) -> str:
    """`text` if it is a valid key, else its safe characters plus a hash of `identity` (default `text`).

    `identity` is what the key stands for in full (the relative path with its extension, when
    `text` is the path without it), so the hash separates everything the safe form dropped.
    """
    if KEY_PATTERN.match(text):
        return text
    readable = _UNSAFE.sub("_", text).strip("_")[:_READABLE_CHARS]
    digest = stable_hash(text if identity is None else identity)
    return f"{readable}_{digest}" if readable else digest


def disambiguate(keys: Sequence[str], identities: Sequence[str]) -> list[str]:
    """`keys` with every key that more than one distinct identity produced made unique by a hash.

    Catches what no single-key rule can: `a.jpg` and `a.png` both named `a`, or image `a_0.jpg`
    meeting the first caption of `a.jpg` (`a_0`). Every member of a clash is renamed, so the
    result does not depend on which came first.
    """
    owners: dict[str, set[str]] = {}
    for key, identity in zip(keys, identities, strict=True):
        owners.setdefault(key, set()).add(identity)
    clashing = {key for key, who in owners.items() if len(who) > 1}
    if not clashing:
        return list(keys)
    return [
        f"{key}_{stable_hash(identity)}" if key in clashing else key
        for key, identity in zip(keys, identities, strict=True)
    ]
