"""Skipping bad samples and shards: counted by reason, logged at a bounded rate, and fatal only when
nothing usable is left.

A corrupt JPEG or a truncated tar in a 10M-sample run must cost one sample, not the run. But a
shard list with no usable sample at all (a non-tar file, a tar whose every caption is broken)
must not spin forever printing a warning per sample: it stops with an error that names the
shards and what was wrong with them.
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from flip.data.shards import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, SampleError, ShardError

log = logging.getLogger(__name__)

# full warnings for the first few skips of each reason; after that one summary line each time the
# total doubles, so that a log grows with the logarithm of the skips, not with the skips
FULL_WARNINGS_PER_REASON = 5
FIRST_SUMMARY_AT = 20
DEFAULT_MAX_CONSECUTIVE_SKIPS = 10_000


class NoUsableSamples(RuntimeError):
    """The shards gave nothing to train or validate on."""


def skip_reason(exn: BaseException) -> str:
    """A short reason for a skipped sample, in the words of `flip-data`'s report where they apply."""
    if isinstance(exn, SampleError | ShardError):
        return exn.reason
    cause = exn.__cause__ if exn.__cause__ is not None and type(exn).__name__ == "DecodingError" else exn
    text = str(cause).lower()
    if isinstance(cause, UnicodeDecodeError):  # before the tar test: its message can say "end of data"
        return "non_utf8_caption"
    if isinstance(cause, tarfile.ReadError | EOFError) or "unexpected end of data" in text:
        return "truncated_tar"
    if isinstance(cause, Image.DecompressionBombError):
        return "decompression_bomb"
    if isinstance(cause, UnidentifiedImageError):
        return "corrupt_image"
    if isinstance(cause, OSError) and "truncated" in text:
        return "truncated_image"
    if isinstance(cause, ValueError) and ("cannot find" in text or "didn't find" in text):
        return "missing_field"  # e.g. an image without its .txt caption
    return type(cause).__name__


@dataclass
class _ShardTally:
    usable: int = 0
    failed: int = 0
    read_visits: int = 0  # complete reads of the shard
    samples_per_read: int = 0


class SkipCounter:
    """A skip handler for one process's stream: counts by reason, logs sparingly, stops a hopeless stream.

    Called with the exception of a skipped sample or shard (webdataset's handler protocol: True
    means skip and go on). Told by the stream of every usable sample (`usable`) and every
    complete read of a shard (`shard_read`), it raises `NoUsableSamples` when

    - `max_consecutive` samples or shards in a row were skipped, or
    - every shard of `urls` has been read through and gave no usable sample: a whole pass over
      the shards yielded nothing (a non-tar file fails at once; a tar whose every caption is
      broken fails once each of its samples did).

    Counts are per process: each loader worker has its own copy.
    """

    def __init__(
        self, urls: Sequence[str] = (), max_consecutive: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS
    ) -> None:
        self.urls = list(urls)
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.by_reason: Counter[str] = Counter()
        self.consecutive = 0
        self.next_summary = FIRST_SUMMARY_AT
        self.shards: dict[str, _ShardTally] = {}
        self.examples: dict[str, str] = {}  # reason -> the first message, for the final error

    def _tally(self, url: str | None) -> _ShardTally | None:
        return None if url is None else self.shards.setdefault(url, _ShardTally())

    def __call__(self, exn: BaseException, key: str | None = None, url: str | None = None) -> bool:
        if type(exn).__name__ == "DecodingError":  # webdataset's wrapper names the sample
            key, url = key or getattr(exn, "key", None), url or getattr(exn, "url", None)
            cause = exn.__cause__ or exn
        else:
            cause = exn
        if isinstance(exn, ShardError):
            url = exn.url
        reason = skip_reason(exn)
        self.skipped += 1
        self.by_reason[reason] += 1
        self.consecutive += 1
        tally = self._tally(url)
        if tally is not None:
            tally.failed += 1
        where = "" if key is None and url is None else f" {key!r} in {url}" if key is not None else f" {url}"
        message = f"{reason} ({type(cause).__name__}: {str(cause)[:300]})"
        self.examples.setdefault(reason, f"{where.strip()}: {message}")
        if self.by_reason[reason] <= FULL_WARNINGS_PER_REASON:
            last = self.by_reason[reason] == FULL_WARNINGS_PER_REASON
            quiet = f" (further {reason} skips are summarised)" if last else ""
            log.warning(
                "skipped a bad sample%s: %s; skipped so far: %s%s", where, message, self.summary(), quiet
            )
        elif self.skipped >= self.next_summary:
            log.warning("skipped %d bad samples so far: %s", self.skipped, self.summary())
        if self.skipped >= self.next_summary:
            self.next_summary *= 2
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            self._stop(f"the last {self.consecutive} samples or shards in a row were all unusable")
        return True

    def usable(self, url: str | None = None) -> None:
        """One sample made it through decoding and the transform."""
        self.consecutive = 0
        tally = self._tally(url)
        if tally is not None:
            tally.usable += 1

    def shard_read(self, url: str, samples: int) -> None:
        """A shard was read to its end (or to its damage) and gave `samples` samples."""
        tally = self._tally(url)
        tally.read_visits += 1
        tally.samples_per_read = max(tally.samples_per_read, samples)
        self._check_pass()

    def _check_pass(self) -> None:
        if not self.urls or len(self.shards) < len(set(self.urls)):
            return
        dead = [
            t.read_visits > 0 and t.usable == 0 and t.failed >= t.samples_per_read
            for u, t in self.shards.items()
            if u in self.urls
        ]
        if len(dead) == len(set(self.urls)) and all(dead):
            self._stop("a whole pass over the shards gave no usable sample")

    def summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items()))

    def _stop(self, why: str) -> None:
        names = ", ".join(self.urls[:5]) + (f" and {len(self.urls) - 5} more" if len(self.urls) > 5 else "")
        examples = "; ".join(self.examples.values())
        raise NoUsableSamples(
            f"no usable (image, caption) samples: {why}. Shards: {names}. Skipped {self.skipped} "
            f"by reason: {self.summary()}. First of each: {examples}. A usable sample is a tar member "
            f"group with an image ({'/'.join(IMAGE_EXTENSIONS)}) and a UTF-8 caption "
            f"({'/'.join(CAPTION_EXTENSIONS)}), as img2dataset and flip-data write them."
        )
