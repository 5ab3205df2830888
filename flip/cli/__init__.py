"""The command-line entry points, the top layer: each parses its arguments and calls the library.

`train` (train.py, flip-train), `evaluate` (eval/*.py), `query` (flip-query), `export`
(flip-export) and `data` (flip-data). Nothing in the library imports them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from flip.config import MOVED_KEYS, check_moved_keys, override_key


def refuse_moved_overrides(moved: Mapping[str, str] = MOVED_KEYS) -> None:
    """Exit with the new key's name when the command line sets a key that moved.

    Runs before Hydra composes: Hydra would refuse the key too, but as "not in struct", which
    does not say where the setting went.
    """
    try:
        check_moved_keys((override_key(arg) for arg in sys.argv[1:]), moved)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
