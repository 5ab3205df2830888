"""One flip-data job split over machines: which records a part owns, and what it names its files.

`--num-parts N --part K` makes a run write only the records it owns: a record belongs to part
`int.from_bytes(sha256(key)[:8], "big") % N`. The key is what the sample is stored under
(`{key}.jpg`), which every source derives from the record itself (its path, its url and box,
its CelebA name), never from where the record sits in a table or a folder listing; so the
parts are the same whatever order the inputs come in, every record lands in exactly one part,
and a key's part can be computed by anyone. Keys that meet (`duplicate_key`) meet in one part,
which keeps the first, as one run would.

Records a source skips while reading (a bad table row, an image no row names) are counted by
the part that owns the place they are reported at (`captions.csv:12`, the image's path), so
the parts' counts add up to one run's. Every part reads every table, so every part must be
given the same inputs and flags, all but `--part`.

All parts write into one output folder, each file of part K named `part-0000K-of-0000N-...`
(its shards, their stats, its report, its lock), so they never touch each other's files and
the folder stays one flat set of shards that training reads as it is, once `flip-data
merge-report` has checked that every part finished and written the folder's `report.json`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flip.atomic import TEMP_SUFFIX
from flip.data.shards import PART_FILE, REPORT_NAME, STATS_SUFFIX, part_tag
from flip.prepare.report import SkipLog

__all__ = ["WHOLE", "Part", "PartSkipLog", "other_layout", "part_of", "stale_temporaries"]

LOCK = ".flip-data.lock"
_WHOLE_SHARD = re.compile(r"^(\d{5,})\.tar$")
_PART_SHARD = re.compile(rf"^{PART_FILE.pattern}-(\d{{5,}})\.tar$")


def part_of(key: str, count: int) -> int:
    """The part (0 to count - 1) that owns `key`: the first 8 bytes of its SHA-256, modulo `count`."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Part:
    """Part `index` of `count` (0-based, as SLURM's array task ids); Part() is the whole job."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        for flag, value in (("--num-parts", self.count), ("--part", self.index)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{flag} {value!r} is not an integer")
        if self.count < 1:
            raise ValueError(f"--num-parts {self.count}: accepted: an integer >= 1")
        if not 0 <= self.index < self.count:
            accepted = "0" if self.count == 1 else f"0 to {self.count - 1}"
            raise ValueError(
                f"--part {self.index} with --num-parts {self.count}: accepted: {accepted} "
                "(parts are numbered from 0, as SLURM array task ids)"
            )

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def prefix(self) -> str:
        """What this part's file names start with: nothing for the whole job."""
        return "" if self.whole else f"{part_tag(self.index, self.count)}-"

    def owns(self, key: str) -> bool:
        return self.whole or part_of(key, self.count) == self.index

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}{index:05d}.tar"

    def stats_name(self, index: int) -> str:
        return f"{self.prefix}{index:05d}{STATS_SUFFIX}"

    def shard_index(self, name: str) -> int | None:
        """The shard number of one of this part's shard file names, else None."""
        match = _WHOLE_SHARD.match(name[len(self.prefix) :]) if name.startswith(self.prefix) else None
        return None if match is None else int(match[1])

    @property
    def report_name(self) -> str:
        return REPORT_NAME if self.whole else f"{self.prefix}{REPORT_NAME}"

    @property
    def lock_name(self) -> str:
        return LOCK if self.whole else f".flip-data.{part_tag(self.index, self.count)}.lock"

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "count": self.count, "owns": "int(sha256(key)[:8]) % count == index"}


WHOLE = Part()  # the job on one machine: every record, files named as before parts existed


def shard_layout(name: str) -> int | None:
    """The `--num-parts` a shard file name was written with (1: the whole job), None if not flip-data's."""
    if _WHOLE_SHARD.match(name):
        return 1
    match = _PART_SHARD.match(name)
    return None if match is None else int(match[2])


def other_layout(output: Path, part: Part) -> str | None:
    """A shard in `output` written with another `--num-parts` (it would be trained on beside this
    run's), described for the error message; None when there is none."""
    for path in sorted(output.glob("*.tar")):
        count = shard_layout(path.name)
        if count is not None and count != part.count:
            written = "one machine (no --num-parts)" if count == 1 else f"--num-parts {count}"
            return f"{path.name!r}, written by a run on {written}"
    return None


def stale_temporaries(output: Path, part: Part) -> list[Path]:
    """Half-written files a killed run of this part left (`.NAME.<random>.tmp`); never another
    part's, which may be writing right now."""
    leftovers = output.glob(f".{part.prefix}*{TEMP_SUFFIX}")
    if part.whole:
        return [p for p in leftovers if not PART_FILE.match(p.name[1:])]
    return list(leftovers)


class PartSkipLog(SkipLog):
    """Skips and items of the records this part owns; the others are only counted (`elsewhere`).

    A source reports skips here while it reads (kept where this part owns the place named);
    the writer asks `keep` for every item. `counts` and `examples` are this part's; `total`
    counts every record read that goes into none of this part's shards (its own skips, and
    every record another part owns), which is what the progress bar adds to the items written:
    every part reads every record.
    """

    def __init__(self, part: Part) -> None:
        super().__init__()
        self.part = part
        self.elsewhere = 0

    def add(self, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        if self.part.owns(where):
            super().add(reason, where, detail, count)
        else:
            SkipLog().add(reason, where, detail, count)  # an unknown reason fails in every part
            self.elsewhere += count

    def keep(self, key: str) -> bool:
        """Whether this part writes the item of `key`; counted as elsewhere when it does not."""
        owned = self.part.owns(key)
        self.elsewhere += not owned
        return owned

    @property
    def total(self) -> int:
        return sum(self.counts.values()) + self.elsewhere
