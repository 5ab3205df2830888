"""Turns a stream of items from a source into webdataset shards: in parallel, resumable, exact.

A source yields `Item`s (key, where the image bytes are, caption, metadata, optional face
box) in a fixed order; this module cuts that stream into shards of `samples_per_shard`
items, and worker processes read, clean and write each shard. Shard i always holds items
[i*n, (i+1)*n) of the stream, so the output does not depend on the worker count, and each
shard is written to a temporary name and renamed only when complete, followed by its
`NNNNN_stats.json`. A shard whose stats file records the same digest of its items and
settings is finished: a rerun skips it (resume after a crash, or after adding settings that
do not change it), and rewrites any shard whose inputs or settings changed.

A run holds a lock on its output folder (`flip.locking`): a second run on the same folder is
refused, naming the first, instead of both deleting each other's temporary files. Workers
die with the run (`flip.data.workers.WorkerPool`), and a dead worker stops the run at once
with `WorkerDied`; every finished shard is kept, so rerunning the same command resumes.

The job is four steps, one function each: `_plan` (cut the stream into shards and find those
already finished), `_write_shards` (write the others, in order or on workers), `_remove_stale`
and `_report`. How a shard's bytes are written, and the output folder's names, are the shared
shard I/O's (`flip.data.shards`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from flip.atomic import write_json_atomic
from flip.data.shards import (
    MARKER,
    PART_FILE,
    PAX_MTIME,
    REPORT_NAME,
    fingerprint,
    write_shard,
)
from flip.data.workers import WorkerDied, WorkerPool
from flip.locking import hold_lock
from flip.prepare.detect import settings as detector_settings
from flip.prepare.hygiene import REASONS, HygieneConfig, SkipSample
from flip.prepare.keys import KEY_PATTERN
from flip.prepare.parts import WHOLE, Part, PartSkipLog, other_layout, stale_temporaries
from flip.prepare.report import SkipLog
from flip.prepare.samples import FaceSteps, FaceTally, shard_samples

__all__ = ["ImageRef", "Item", "JobConfig", "OutputFolderError", "Source", "run_job", "shard_name"]

log = logging.getLogger(__name__)

VERSION = "1"  # bump when the bytes written for the same item and settings change
RESERVED_KEYS = (
    *("key", "caption", "source", "width", "height", "original_width", "original_height", "crop"),
    *("face", "align"),
)


class OutputFolderError(RuntimeError):
    """The output folder cannot be created or written; the message names it and why."""


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes are: a file, or (`offset`, `size`) inside a tar file."""

    path: str
    offset: int | None = None
    size: int | None = None
    member: str | None = None

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                if self.offset is None:
                    return f.read()
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as exc:
            raise SkipSample("missing_image", f"{self.describe()}: {exc.strerror or exc}") from None
        if self.size is not None and len(data) != self.size:
            raise SkipSample(
                "truncated_image", f"{self.describe()}: {len(data)} of {self.size} bytes in the tar"
            )
        return data

    def describe(self) -> str:
        return self.path if self.member is None else f"{self.path}#{self.member}"


@dataclass
class Item:
    """One sample to write. `metadata` goes into `{key}.json` beside the source and sizes."""

    key: str
    image: ImageRef
    caption: str
    metadata: dict[str, Any] = field(default_factory=dict)
    box: tuple[float, float, float, float] | None = None


class Source(Protocol):
    """What `run_job` needs from a data source."""

    command: str

    def describe(self) -> dict[str, Any]:
        """JSON-able settings of the source, for the report."""
        ...

    def total(self) -> int | None:
        """Records `items` goes through (items yielded + records skipped while reading), if known;
        it may become known, or change, while `items` runs (for the progress bar)."""
        ...

    def items(self, skips: SkipLog) -> Iterator[Item]:
        """Items in a deterministic order; records that cannot become items go to `skips`."""
        ...


@dataclass(frozen=True)
class JobConfig:
    output: Path
    samples_per_shard: int = 1000
    workers: int = 1
    hygiene: HygieneConfig = field(default_factory=HygieneConfig)
    faces: FaceSteps = field(default_factory=FaceSteps)
    progress: bool = True
    part: Part = WHOLE  # --num-parts/--part: write only the records this part owns (flip.prepare.parts)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard}; accepted: >= 1")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}; accepted: >= 1")

    def fingerprint(self) -> dict[str, Any]:
        """Everything besides the items that changes the bytes of a shard."""
        settings = {"version": VERSION, "hygiene": asdict(self.hygiene), "detector": None}
        detector = self.faces.detector
        if detector is not None:  # without one, the settings (and digests) of the shards before faces
            settings["detector"] = detector_settings(detector)
            settings["faces"] = asdict(self.faces.policy)
            settings["align"] = None if self.faces.align is None else self.faces.align.describe()
        return settings


def shard_name(index: int, part: Part = WHOLE) -> str:
    return part.shard_name(index)


def _stats_path(output: Path, index: int, part: Part) -> Path:
    return output / part.stats_name(index)


def _digest(config: dict[str, Any], items: list[Item]) -> str:
    records = ([item.key, asdict(item.image), item.caption, item.metadata, item.box] for item in items)
    return fingerprint([config, *records], length=24)


def _finished(output: Path, index: int, digest: str, part: Part) -> dict | None:
    """The stats of shard `index` if it was completed from exactly these items and settings."""
    path = _stats_path(output, index, part)
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stats, dict) or stats.get("digest") != digest:
        return None
    return stats if (output / shard_name(index, part)).is_file() else None


@dataclass
class _ShardTask:
    index: int
    items: list[Item]
    digest: str
    output: Path
    hygiene: HygieneConfig
    faces: FaceSteps
    part: Part = WHOLE


def make_shard(task: _ShardTask) -> dict[str, Any]:
    """Reads, cleans and writes one shard, then its stats file (last: it marks the shard finished)."""
    skips, faces = SkipLog(), FaceTally()
    final = task.output / shard_name(task.index, task.part)
    samples = shard_samples(task.items, task.hygiene, task.faces, skips, faces)
    written = write_shard(final, samples, mtime=PAX_MTIME)  # PAX_MTIME: the bytes VERSION has always written
    stats = {
        "shard": final.name,
        "digest": task.digest,
        "items": len(task.items),
        "written": written,
        "skipped": skips.to_json(),
    }
    if task.faces.detector is not None:
        stats["faces"] = faces.to_json()
    write_json_atomic(_stats_path(task.output, task.index, task.part), stats)
    return stats


def _chunks(items: Iterable[Item], size: int, skips: SkipLog) -> Iterator[list[Item]]:
    """Fixed-size lists of items with unique, tar-safe keys; later duplicates are skipped."""
    seen: set[str] = set()
    chunk: list[Item] = []
    for item in items:
        if not KEY_PATTERN.match(item.key):
            raise ValueError(f"source produced key {item.key!r}; keys must match [A-Za-z0-9_-]+")
        if item.key in seen:
            skips.add(
                "duplicate_key", item.key, f"{item.image.describe()}: key already used by an earlier sample"
            )
            continue
        seen.add(item.key)
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextlib.contextmanager
def _own_output(output: Path, part: Part) -> Iterator[None]:
    """The output folder, created if needed and locked for this run (for this part: the parts of a
    job write one folder side by side); unwritable: OutputFolderError."""
    what = f"output folder {str(output)!r}" + ("" if part.whole else f" (part {part.index} of {part.count})")
    with contextlib.ExitStack() as stack:
        try:
            output.mkdir(parents=True, exist_ok=True)
            stack.enter_context(hold_lock(output / part.lock_name, what))
        except OSError as exc:
            raise OutputFolderError(
                f"cannot write to output folder {str(output)!r} ({exc.strerror or exc}); "
                "choose a folder you can write to with --output"
            ) from None
        yield


def _check_output(output: Path, part: Part) -> None:
    """Refuses a folder holding `.tar` files that flip-data did not write (they would be trained on).

    The first run marks the folder as flip-data's (`.flip-data`); any shard in a marked folder,
    even one whose stats file a crash kept from being written, is then flip-data's to redo.
    Shards of another `--num-parts` are refused too (both sets would be trained on), and a part
    removes its own report and the folder's merged one: until every part has finished again
    and `flip-data merge-report` has run, training refuses the folder as unfinished.
    An unwritable folder raises OutputFolderError.
    """
    marker = output / MARKER
    try:
        if not marker.is_file():
            # a part's shards are flip-data's even before the marker: parts may start together
            foreign = sorted(p.name for p in output.glob("*.tar") if not PART_FILE.match(p.name))
            if foreign:
                raise FileExistsError(
                    f"output folder {str(output)!r} holds .tar files that flip-data did not write "
                    f"(e.g. {foreign[0]!r}); choose an empty or new --output"
                )
            marker.write_text("shards in this folder are written by flip-data; it may replace them\n")
        mixed = other_layout(output, part)
        if mixed is not None:
            raise OutputFolderError(
                f"output folder {str(output)!r} holds shards of another split of the job, e.g. {mixed}; "
                f"this run is on {'one machine' if part.whole else f'--num-parts {part.count}'}. "
                "Choose a new --output, or delete the other run's shards"
            )
        if not part.whole:
            (output / part.report_name).unlink(missing_ok=True)
            (output / REPORT_NAME).unlink(missing_ok=True)
        for leftover in stale_temporaries(output, part):  # half-written files of a killed run
            leftover.unlink(missing_ok=True)
    except PermissionError as exc:
        raise OutputFolderError(
            f"cannot write to output folder {str(output)!r} ({exc.strerror}); "
            "choose a folder you can write to with --output"
        ) from None


def _remove_stale(output: Path, count: int, part: Part) -> list[str]:
    """This part's shards of an earlier run beyond this run's last one (the input shrank): removed."""
    removed = []
    for path in sorted(output.glob("*.tar")):
        index = part.shard_index(path.name)
        if index is not None and index >= count:
            path.unlink()
            _stats_path(output, index, part).unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _describe_task(task: _ShardTask) -> str:
    return f"shard {shard_name(task.index, task.part)}"


def _plan(source: Source, config: JobConfig, output: Path, skips: SkipLog) -> Iterator[_ShardTask | dict]:
    """Shard by shard, in order: a task to write it, or the stats of its finished earlier write.

    Records the source cannot turn into items, and duplicate keys, go to `skips` as the stream
    is read (lazily: a shard is planned only when a worker is free for it). A part of a job
    (`skips` is then a PartSkipLog) plans only the items it owns.
    """
    settings = config.fingerprint()
    items = source.items(skips)
    if isinstance(skips, PartSkipLog):
        items = (item for item in items if skips.keep(item.key))
    for index, chunk in enumerate(_chunks(items, config.samples_per_shard, skips)):
        digest = _digest(settings, chunk)
        done = _finished(output, index, digest, config.part)
        yield (
            done
            if done is not None
            else _ShardTask(index, chunk, digest, output, config.hygiene, config.faces, config.part)
        )


@dataclass
class _Tally:
    """Stats of every finished shard (resumed or written) and the skips inside them."""

    stats: dict[int, dict] = field(default_factory=dict)
    skips: SkipLog = field(default_factory=SkipLog)
    faces: FaceTally = field(default_factory=FaceTally)
    resumed: int = 0

    def add(self, index: int, stats: dict, resumed: bool) -> None:
        self.stats[index] = stats
        self.skips.merge(stats["skipped"])
        if "faces" in stats:
            self.faces.merge(stats["faces"])
        self.resumed += resumed

    def count(self, field_name: str) -> int:
        return sum(s[field_name] for s in self.stats.values())


class _Progress:
    """The bar counts records: items handed to workers plus records skipped while reading."""

    def __init__(self, source: Source, plan_skips: SkipLog, enabled: bool) -> None:
        self.source, self.plan_skips, self.counted_plan_skips = source, plan_skips, 0
        self.bar = tqdm(
            total=source.total(),
            desc=f"flip-data {source.command}",
            unit="img",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
        )

    def advance(self, items: int, tally: _Tally) -> None:
        total = self.source.total()  # some sources only know it once they have read their tables
        if total != self.bar.total:
            self.bar.total = total
            self.bar.refresh()
        self.bar.update(items + self.plan_skips.total - self.counted_plan_skips)
        self.counted_plan_skips = self.plan_skips.total
        skipped = sum(self.plan_skips.counts.values()) + tally.skips.total  # this part's, for a part
        self.bar.set_postfix(written=tally.count("written"), skipped=skipped)

    def close(self) -> None:
        self.bar.close()


def _write_shards(
    plan: Iterator[_ShardTask | dict], config: JobConfig, output: Path, progress: _Progress
) -> _Tally:
    """Writes the planned shards (in order with one worker, else as workers finish them)."""
    tally = _Tally()

    def record(index: int, stats: dict, resumed: bool = False) -> None:
        tally.add(index, stats, resumed)
        progress.advance(stats["items"], tally)

    def to_write() -> Iterator[_ShardTask]:
        for index, task in enumerate(plan):
            if isinstance(task, _ShardTask):
                yield task
            else:
                record(index, task, resumed=True)

    if config.workers == 1:
        for task in to_write():
            record(task.index, make_shard(task))
    else:
        try:
            with WorkerPool(make_shard, config.workers, _describe_task) as pool:
                for task, stats in pool.imap_unordered(to_write()):  # one task per worker in flight
                    record(task.index, stats)
        except WorkerDied as exc:
            raise WorkerDied(
                f"{exc}. The run stopped; the {len(tally.stats)} shard(s) finished in "
                f"{str(output)!r} are kept: rerun the same command to resume"
            ) from None
    progress.advance(0, tally)  # records skipped after the last shard's items
    return tally


def _report(
    source: Source,
    config: JobConfig,
    output: Path,
    tally: _Tally,
    skips: SkipLog,
    removed: list[str],
    seconds: float,
) -> dict[str, Any]:
    """What the run did, for `report.json`: settings, shards, and skips by reason with examples."""
    count = len(tally.stats)
    part = {} if config.part.whole else {"part": config.part.describe()}
    return {
        **part,
        "command": source.command,
        "source": source.describe(),
        "settings": {
            **config.fingerprint(),
            "samples_per_shard": config.samples_per_shard,
            "workers": config.workers,
        },
        "output": str(output.resolve()),
        "shards": [shard_name(i, config.part) for i in range(count)],
        "samples": {"written": tally.count("written"), "skipped": skips.total, "items": tally.count("items")},
        "skipped_by_reason": dict(sorted(skips.counts.items())),
        "reasons": {reason: REASONS[reason] for reason in sorted(skips.counts)},
        "examples": skips.to_json()["examples"],
        # faces the detector found, chosen and left out by reason (null: no detector ran)
        "faces": None if config.faces.detector is None else tally.faces.to_json(),
        "shards_resumed": tally.resumed,
        "shards_written": count - tally.resumed,
        "stale_shards_removed": removed,
        "seconds": round(seconds, 2),
    }


def run_job(source: Source, config: JobConfig) -> dict[str, Any]:
    """Writes every shard of `source` into `config.output` and returns (and writes) the report.

    Raises FolderBusyError when another run holds the folder, OutputFolderError when it cannot
    be written, and WorkerDied (saying how to resume) when a worker process dies. A part of a
    job (`config.part`) writes its own files into the folder, its report as `part-...-report.json`.
    """
    output = Path(config.output)
    with _own_output(output, config.part):
        start = time.time()
        _check_output(output, config.part)
        plan_skips = SkipLog() if config.part.whole else PartSkipLog(config.part)
        progress = _Progress(source, plan_skips, config.progress)
        try:
            tally = _write_shards(_plan(source, config, output, plan_skips), config, output, progress)
        finally:
            progress.close()
        removed = _remove_stale(output, len(tally.stats), config.part)
        skips = SkipLog()
        skips.merge(plan_skips)
        skips.merge(tally.skips)
        report = _report(source, config, output, tally, skips, removed, time.time() - start)
        write_json_atomic(output / config.part.report_name, report)
        _log_summary(report, output)
    return report


def _log_summary(report: dict[str, Any], output: Path) -> None:
    skipped = report["skipped_by_reason"]
    log.info(
        "flip-data %s: %d samples written to %d shards in %s (%d skipped: %s; %d shards already done)",
        report["command"],
        report["samples"]["written"],
        len(report["shards"]),
        output
        if "part" not in report
        else f"{output} (part {report['part']['index']} of {report['part']['count']})",
        report["samples"]["skipped"],
        ", ".join(f"{k} {v}" for k, v in skipped.items()) or "none",
        report["shards_resumed"],
    )
