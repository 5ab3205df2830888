"""`flip-data curate`: shards in, curated shards out, in three resumable steps.

1. Scan (`scan.py`): every input shard read once, its samples checked and hashed; with a model,
   every pair scored (`agreement.py`). Each shard's result is cached in `OUT/.curate/`, so a
   killed run resumes at the first shard not yet scanned, and a rerun with other thresholds
   decodes nothing again.
2. Select (`select.py`): the filters decide, over the whole collection at once (duplicates,
   a top fraction and entry counts are global), which samples stay.
3. Write: the kept samples, in input order, go through flip-data's own writer
   (`flip.prepare.writer.run_job`) as a source whose images are byte ranges of the input tars:
   the same shards, stats files, `report.json` (with every removal counted under its filter's
   reason and examples), resume and locking as every other flip-data command. A JPEG is copied
   byte for byte; the sample's `.json` keeps the input's fields and gains `phash` and, when
   scored, `agreement`.

`curation.json`, `curation.png` and `curation_removed.jsonl` (`report.py`) are written last.

Many machines: `--num-parts N --part K` runs step 1 only, for the input shards part K owns
(`flip.prepare.parts`, keyed by the shard's resolved path, the path its cache entries are
named by), under a lock of its own (`.curate/part-0000K-of-0000N-lock`), so the N parts fill
one cache side by side; the run without `--part` then reads every shard back and selects and
writes. Only that whole run removes cache entries, and only those no current input shard needs
with its settings, so parts never remove each other's work; it refuses while a part runs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from flip.atomic import atomic_file
from flip.curation.agreement import Scorer
from flip.curation.report import curation_report, write_report
from flip.curation.scan import Sample, ScanTask, find_inputs, read_cached, samples_of, scan_shard
from flip.curation.select import Filters, Selection, select
from flip.data.shards import MARKER
from flip.data.workers import WorkerPool
from flip.locking import hold_lock
from flip.prepare.balance import Entry, read_entries
from flip.prepare.hygiene import HygieneConfig
from flip.prepare.parts import WHOLE, Part
from flip.prepare.report import SkipLog
from flip.prepare.writer import RESERVED_KEYS, ImageRef, Item, JobConfig, OutputFolderError, run_job

__all__ = ["CurateConfig", "curate"]

log = logging.getLogger(__name__)

CACHE = ".curate"
# fields of an input sample's .json that the writer sets anew; kept under "origin" (once: a
# curated shard curated again keeps the first origin, the one that names the original photo)
ORIGIN_KEYS = tuple(k for k in RESERVED_KEYS if k not in ("key", "caption", "width", "height"))


@dataclass(frozen=True)
class CurateConfig:
    inputs: tuple[Path, ...]
    output: Path
    filters: Filters = field(default_factory=Filters)
    entries: Path | None = None
    samples_per_shard: int = 1000
    workers: int = 1
    max_pixels: int = 89_478_485
    progress: bool = True
    part: Part = WHOLE


@dataclass
class _Scanned:
    """Every input sample in input order, where it came from, and the scan's bookkeeping."""

    shards: list[Path]
    samples: list[Sample] = field(default_factory=list)
    shard_of: list[int] = field(default_factory=list)
    shard_problems: dict[int, tuple[str, str]] = field(default_factory=dict)
    scores: np.ndarray | None = None
    features: np.ndarray | None = None
    stats: dict[str, int] = field(default_factory=dict)

    def name(self, i: int) -> str:
        return f"{self.shards[self.shard_of[i]].name}#{self.samples[i].key}"


class CuratedSource:
    """The kept samples as flip-data items; every removal goes to the writer's skip log."""

    command = "curate"

    def __init__(self, scanned: _Scanned, selection: Selection, description: dict[str, Any]) -> None:
        self.scanned, self.selection, self.description = scanned, selection, description

    def describe(self) -> dict[str, Any]:
        return self.description

    def total(self) -> int:
        return len(self.scanned.samples) + len(self.scanned.shard_problems)

    def _metadata(self, i: int) -> dict[str, Any]:
        sample = self.scanned.samples[i]
        given = sample.metadata or {}
        metadata = {k: v for k, v in given.items() if k not in RESERVED_KEYS}
        origin = {k: given[k] for k in ORIGIN_KEYS if k in given}
        if origin and "origin" not in metadata:
            metadata["origin"] = origin
        metadata["phash"] = sample.phash
        if self.scanned.scores is not None:
            metadata["agreement"] = float(self.scanned.scores[i])
        return metadata

    def items(self, skips: SkipLog) -> Iterator[Item]:
        scanned = self.scanned
        for index, (reason, detail) in sorted(scanned.shard_problems.items()):
            skips.add(reason, str(scanned.shards[index]), detail)
        for i, sample in enumerate(scanned.samples):
            reason = self.selection.reasons[i]
            if reason is not None:
                skips.add(reason, scanned.name(i), self.selection.details[i])
                continue
            path = str(scanned.shards[scanned.shard_of[i]])
            image = ImageRef(path, sample.offset, sample.size, sample.member)
            yield Item(sample.key, image, sample.caption, self._metadata(i))


def _check_output(output: Path, shards: list[Path]) -> None:
    """Refuses an output folder that holds an input shard, or .tar files flip-data did not write."""
    target = output.resolve()
    for shard in shards:
        if shard.resolve().parent == target:
            raise ValueError(
                f"output folder {str(output)!r} holds input shard {shard.name!r}; "
                "curated shards would overwrite the inputs: choose another --output"
            )
    if output.is_dir() and not (output / MARKER).is_file():
        foreign = sorted(p.name for p in output.glob("*.tar"))
        if foreign:
            raise FileExistsError(
                f"output folder {str(output)!r} holds .tar files that flip-data did not write "
                f"(e.g. {foreign[0]!r}); choose an empty or new --output"
            )


def shard_owner_key(shard: Path) -> str:
    """What decides which part scans a shard: its resolved path, which also names its cache
    entries (so parts and the whole run agree on both wherever they were started from)."""
    return str(shard.resolve())


def _scan(shards: list[Path], config: CurateConfig, cache: Path, scorer: Scorer | None) -> _Scanned:
    """Scans (or reads back) every input shard the run's part owns, then scores it (or reads
    its scores back); the whole run owns every shard and removes cache entries it does not use."""
    scanned = _Scanned(shards)
    kind = config.filters.hash_kind
    owned = [i for i, shard in enumerate(shards) if config.part.owns(shard_owner_key(shard))]
    tasks, results, used = [], {}, set()
    for index in owned:
        shard = shards[index]
        digest = ScanTask.digest(shard, kind, config.max_pixels)
        path = cache / "scan" / f"{shard.stem}-{digest}.json"
        used.add(path)
        found = read_cached(path)
        if found is None:
            tasks.append(ScanTask(index, str(shard), str(path), kind, config.max_pixels))
        else:
            results[index] = found
    scanned.stats = {"shards": len(owned), "scanned_from_cache": len(results), "scored_from_cache": 0}
    bar = tqdm(total=len(owned), initial=len(results), desc="curate: scan", unit="shard",
               file=sys.stderr, disable=not config.progress)  # fmt: skip
    with bar:
        if config.workers > 1 and len(tasks) > 1:
            with WorkerPool(scan_shard, config.workers, lambda t: t.path) as pool:
                for task, result in pool.imap_unordered(tasks):
                    results[task.index] = result
                    bar.update()
        else:
            for task in tasks:
                results[task.index] = scan_shard(task)
                bar.update()
    all_scores, all_features = [], []
    for index in owned:
        shard, result = shards[index], results[index]
        if result["problem"] is not None:
            scanned.shard_problems[index] = (result["problem"], result["detail"])
        samples = samples_of(result)
        scanned.samples += samples
        scanned.shard_of += [index] * len(samples)
        if scorer is not None:
            digest = ScanTask.digest(shard, kind, config.max_pixels)
            path = cache / "scores" / f"{shard.stem}-{scorer.fingerprint(digest)}.npz"
            used.add(path)
            scores, features = _scores(path, shard, samples, scorer, scanned.stats)
            all_scores.append(scores)
            all_features.append(features)
    if scorer is not None:
        scanned.scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
        if scorer.keep_features:
            scanned.features = np.concatenate(all_features)
    if config.part.whole:  # a part never removes anything: another part may be writing it now
        for stale in [*cache.glob("scan/*.json"), *cache.glob("scores/*.npz")]:
            if stale not in used:
                stale.unlink(missing_ok=True)
    return scanned


def _scores(
    path: Path, shard: Path, samples: list[Sample], scorer: Scorer, stats: dict[str, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """A shard's scores (and features) from the cache, or computed and cached (no pickle)."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        with np.load(path, allow_pickle=False) as cached:
            scores = cached["scores"]
            features = cached["features"] if scorer.keep_features else None
        if len(scores) == len(samples):
            stats["scored_from_cache"] += 1
            return scores, features
    scores, features = scorer.score(shard, samples)
    arrays = {"scores": scores} | ({"features": features} if features is not None else {})
    with atomic_file(path) as f:
        np.savez(f, **arrays)
    return scores, features


def _scan_part(
    shards: list[Path], config: CurateConfig, cache: Path, scorer: Scorer | None
) -> dict[str, Any]:
    """`--part K`: scans (and scores) the shards part K owns into the cache, and nothing else;
    a small report of what it did."""
    part = config.part
    what = f"part {part.index} of {part.count} of output folder {str(config.output)!r} (curate)"
    with hold_lock(cache / f"{part.prefix}lock", what):
        stats = _scan(shards, config, cache, scorer).stats
    owned = stats["shards"]
    scored_from_cache = stats["scored_from_cache"] if scorer is not None else 0
    return {
        "output": str(config.output),
        "part": {"index": part.index, "count": part.count},
        "inputs": len(shards),
        "shards": owned,
        "scanned": owned - stats["scanned_from_cache"],
        "scanned_from_cache": stats["scanned_from_cache"],
        "scored": owned - scored_from_cache if scorer is not None else 0,
        "scored_from_cache": scored_from_cache,
    }


@contextlib.contextmanager
def _no_part_running(cache: Path, output: Path) -> Iterator[None]:
    """Holds every part's lock while the whole run selects: FolderBusyError naming a part still
    scanning, whose shards would otherwise be scanned twice, or its entries judged stale."""
    with contextlib.ExitStack() as held:
        for lock in sorted(cache.glob("part-*-lock")):
            what = f"{lock.name[: -len('-lock')]} of output folder {str(output)!r} (curate --part)"
            held.enter_context(hold_lock(lock, what))
        yield


def curate(config: CurateConfig, scorer: Scorer | Callable[[], Scorer] | None = None) -> dict[str, Any]:
    """Curates `config.inputs` into `config.output`; returns {"report": report.json's content,
    "curation": curation.json's}. With `config.part` a part of several, only scans and scores
    the shards it owns into the cache and returns {"scan": what it did} (the others None).

    `scorer` scores pairs (or a function that loads it, called once the inputs, entries and
    output folder are known to be good: a large model is not loaded for a run that fails on a
    typo). Nothing is written before those checks; FolderBusyError when another curate run
    holds the output folder.
    """
    filters = config.filters
    if filters.needs_model and scorer is None:
        raise ValueError(
            "--min-agreement, --keep-top-fraction and --min-embedding-cosine need a model "
            "(--model CKPT or --open-clip ARCH)"
        )
    shards = find_inputs(list(config.inputs))
    entries: list[Entry] | None = None
    if config.entries is not None:
        if filters.max_per_entry is None:
            raise ValueError("--entries needs --max-per-entry (how many samples an entry may contribute)")
        entries = read_entries(config.entries)
    elif filters.max_per_entry is not None:
        raise ValueError("--max-per-entry needs --entries (the file of metadata entries)")
    output = Path(config.output)
    _check_output(output, shards)
    if scorer is not None and not isinstance(scorer, Scorer):
        scorer = scorer()
    if filters.min_embedding_cosine is not None and not scorer.keep_features:
        raise ValueError("the scorer must keep image features for --min-embedding-cosine")
    cache = output / CACHE
    try:
        for folder in ("scan", "scores"):
            (cache / folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(
            f"cannot write to output folder {str(output)!r} ({exc.strerror or exc}); "
            "choose a folder you can write to with --output"
        ) from None
    if not config.part.whole:
        return {"report": None, "curation": None, "scan": _scan_part(shards, config, cache, scorer)}
    lock = hold_lock(cache / "lock", f"output folder {str(output)!r} (curate)")
    with lock, _no_part_running(cache, output):
        scanned = _scan(shards, config, cache, scorer)
        names = [scanned.name(i) for i in range(len(scanned.samples))]
        selection = select(scanned.samples, names, filters, scanned.scores, scanned.features, entries)
        model = None if scorer is None else scorer.identity
        description = {
            "inputs": [str(p) for p in shards],
            "filters": filters.to_json(),
            "model": model,
            "entries": None if config.entries is None else str(config.entries),
        }
        hygiene = HygieneConfig(max_pixels=config.max_pixels)
        job = JobConfig(output, config.samples_per_shard, config.workers, hygiene, progress=config.progress)
        written = run_job(CuratedSource(scanned, selection, description), job)
        problems: dict[str, int] = {}
        for reason, _ in scanned.shard_problems.values():
            problems[reason] = problems.get(reason, 0) + 1
        report = curation_report(
            shards,
            scanned.samples,
            problems,
            selection,
            filters,
            scanned.scores,
            model,
            entries,
            scanned.stats,
        )
        write_report(output, report, scanned.samples, names, selection)
    log.info(
        "flip-data curate: kept %d of %d samples (%s)",
        report["samples"]["kept"],
        report["samples"]["read"],
        ", ".join(f"{k} {v}" for k, v in report["removed_by_filter"].items() if v) or "nothing removed",
    )
    return {"report": written, "curation": report}
