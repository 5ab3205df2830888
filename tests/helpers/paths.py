"""Where the repository and its Hydra configs are: tests run `train.py` from ROOT and compose from CONF."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
