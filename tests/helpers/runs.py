"""A finished training run shared by many tests, and the check that none of them changed it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@dataclass(frozen=True)
class TrainedRun:
    """One train.py run, as it left its folder. Shared: a test reads it and copies what it would
    change to its own tmp_path; `changes()` names anything written, added or removed since."""

    root: Path  # FLIP_ROOT of the run: data/ (the FaceShapes it generated) and run/
    cfg: DictConfig  # the composed config it trained with
    results: dict  # what train() returned
    _as_trained: dict[str, tuple[int, int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_as_trained", _listing(self.root))

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def ckpt(self) -> Path:
        return self.run / "checkpoints" / "last.ckpt"

    @property
    def faceshapes(self) -> Path:
        return self.root / "data" / "faceshapes"

    def changes(self) -> list[str]:
        now = _listing(self.root)
        return sorted(
            name
            for name in now.keys() | self._as_trained.keys()
            if now.get(name) != self._as_trained.get(name)
        )
