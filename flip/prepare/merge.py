"""`flip-data merge-report OUT`: the report of a job written in parts, once every part has finished.

Each part of a job (`--num-parts N --part K`, `flip.prepare.parts`) writes its report beside
its shards as its last act. Merging checks that all N did, names every part that did not (never
started, still running, killed before the end, a shard of its report gone) and refuses; then it
checks that the parts ran the same job (the same source and settings: every part reads every
table, so parts of different jobs would not add up) and writes the folder's `report.json` with
the counts summed. That file is what training looks for before it reads a flip-data folder, so
a folder written in parts trains only once its merge has run, and a part that runs again
removes it.

The parts' files are only read. The merge holds every part's lock while it reads (a running
part's lock is only reported, with who holds it), so no part can start in between.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from flip.atomic import write_json_atomic
from flip.data.shards import PART_FILE, REPORT_NAME, part_tag
from flip.locking import FolderBusyError, hold_lock
from flip.prepare.parts import LOCK, Part
from flip.prepare.report import SkipLog
from flip.prepare.samples import FaceTally

__all__ = ["UnfinishedParts", "merge_reports", "part_count"]

PER_MACHINE = ("workers",)  # settings that may differ between the parts of one job
SUMMED = ("shards_resumed", "shards_written")


class UnfinishedParts(RuntimeError):
    """Some part has not finished; the message names each one, what was found and what to do."""


def part_count(output: Path) -> int:
    """The `--num-parts` the parts in `output` were run with, read from their file names."""
    counts = sorted({int(m[2]) for p in output.iterdir() if (m := PART_FILE.search(p.name))})
    if not counts:
        single = (output / REPORT_NAME).is_file()
        raise ValueError(
            f"{str(output)!r} holds no part of a job run with --num-parts"
            + (f" (its {REPORT_NAME} is a one-machine run's, complete as it is)" if single else "")
            + "; run every part, flip-data ... --num-parts N --part K for K = 0 .. N-1, then merge"
        )
    if len(counts) > 1:
        raise ValueError(
            f"{str(output)!r} holds parts of jobs split differently "
            f"(--num-parts {', '.join(map(str, counts))}); "
            "keep one split: delete the other's files (named part-*-of-<N>-*) or write it to its own folder"
        )
    return counts[0]


def _running(stack: contextlib.ExitStack, output: Path, part: Part) -> str | None:
    """Holds the part's lock for the merge; who holds it instead, when the part is running."""
    lock = output / part.lock_name
    if not lock.exists():  # the part never started; a run starting now finds no merged report
        return None
    try:
        stack.enter_context(hold_lock(lock, f"part {part.index}"))
    except FolderBusyError:
        holder = lock.read_text(encoding="utf-8", errors="replace").strip() or "a process"
        return f"still running: {holder}"
    return None


def _report_of(output: Path, part: Part) -> tuple[dict[str, Any] | None, str]:
    """The part's report if the part finished, else (None, what is wrong)."""
    path = output / part.report_name
    if not path.is_file():
        tag = part_tag(part.index, part.count)
        files = [p for p in output.iterdir() if tag in p.name]
        if not files:
            return None, "never ran: no file of it in the folder"
        finished = sum(1 for p in files if p.name.endswith("_stats.json"))
        return None, f"no {part.report_name}: it stopped before the end, {finished} shard(s) finished"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        written = (report["part"]["index"], report["part"]["count"])
    except (ValueError, KeyError, TypeError):
        return None, f"{part.report_name} is not a part's report"
    if written != (part.index, part.count):
        return None, f"{part.report_name} says part {written[0]} of {written[1]}"
    missing = [name for name in report.get("shards", []) if not (output / name).is_file()]
    if missing:
        return None, f"{len(missing)} shard(s) of its report are gone, e.g. {missing[0]!r}"
    return report, ""


def _same_job(reports: list[dict[str, Any]]) -> None:
    """Parts run with other inputs or settings do not add up to one job: refused, naming them."""

    def job(report: dict[str, Any]) -> dict[str, Any]:
        settings = {k: v for k, v in report.get("settings", {}).items() if k not in PER_MACHINE}
        return {"command": report.get("command"), "source": report.get("source"), "settings": settings}

    first = job(reports[0])
    for index, report in enumerate(reports[1:], start=1):
        other = job(report)
        differs = [key for key in first if other[key] != first[key]]
        if differs:
            raise ValueError(
                f"part {index} was run with other {' and '.join(differs)} than part 0 "
                f"({json.dumps(other[differs[0]], sort_keys=True)[:300]} against "
                f"{json.dumps(first[differs[0]], sort_keys=True)[:300]}); run every part with the same "
                "inputs and flags, all but --part"
            )


def _faces(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The detector's counts summed over the parts (None: no detector ran, as in each part)."""
    if reports[0].get("faces") is None:
        return None
    tally = FaceTally()
    for report in reports:
        tally.merge(report["faces"])
    return tally.to_json()


def _combine(reports: list[dict[str, Any]], output: Path) -> dict[str, Any]:
    skips, reasons = SkipLog(), {}
    for report in reports:
        skips.merge({"counts": report["skipped_by_reason"], "examples": report["examples"]})
        reasons.update(report["reasons"])
    first = reports[0]
    return {
        "command": first["command"],
        "source": first["source"],
        "settings": {k: v for k, v in first["settings"].items() if k not in PER_MACHINE},
        "parts": {
            "count": len(reports),
            "owns": first["part"]["owns"],
            "reports": [Part(k, len(reports)).report_name for k in range(len(reports))],
            "workers": [r["settings"].get("workers") for r in reports],
            "seconds": [r["seconds"] for r in reports],
        },
        "output": str(output.resolve()),
        "shards": [name for r in reports for name in r["shards"]],
        "samples": {k: sum(r["samples"][k] for r in reports) for k in ("written", "skipped", "items")},
        "skipped_by_reason": dict(sorted(skips.counts.items())),
        "reasons": dict(sorted(reasons.items())),
        "examples": skips.to_json()["examples"],
        "faces": _faces(reports),
        **{k: sum(r[k] for r in reports) for k in SUMMED},
        "stale_shards_removed": [name for r in reports for name in r["stale_shards_removed"]],
        "seconds": round(sum(r["seconds"] for r in reports), 2),  # machine time, all parts together
    }


def merge_reports(output: str | Path) -> dict[str, Any]:
    """Checks that every part in `output` finished and writes (and returns) its combined report.

    Raises UnfinishedParts naming every part that did not finish, ValueError when the folder
    holds no parts, parts of differently split jobs or of different jobs, FileNotFoundError
    when it does not exist, and FolderBusyError while a one-machine run or a merge holds it.
    """
    output = Path(output)
    if not output.is_dir():
        raise FileNotFoundError(f"output folder {str(output)!r} does not exist")
    count = part_count(output)
    with contextlib.ExitStack() as stack:
        stack.enter_context(hold_lock(output / LOCK, f"output folder {str(output)!r}"))
        reports, problems = [], []
        for part in (Part(k, count) for k in range(count)):
            report, problem = None, _running(stack, output, part)
            if problem is None:
                report, problem = _report_of(output, part)
            if report is None:
                problems.append(f"part {part.index} ({problem})")
            reports.append(report)
        if problems:
            raise UnfinishedParts(
                f"{len(problems)} of {count} parts in {str(output)!r} did not finish: {'; '.join(problems)}. "
                "Run each of them again (the same command with its --part; finished shards are kept), "
                "then merge again"
            )
        _same_job(reports)
        merged = _combine(reports, output)
        write_json_atomic(output / REPORT_NAME, merged)
    return merged
