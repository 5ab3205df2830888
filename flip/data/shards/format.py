"""The names every FLIP shard reader and writer agree on: member extensions and output folder layout.

A shard is a webdataset tar: the members of one sample share a key (`{key}.jpg`,
`{key}.txt`, `{key}.json`) and are stored one after another. Readers accept the member
extensions listed here and nothing else; the folder readers (`flip-data folder`, the folder
benchmark, `flip-query`) accept image files by the same list, so an image that one of them
reads is never silently ignored by another.

flip-data's output folders (`flip.prepare.writer`) carry a marker file, a stats file per
shard and a report written last; training (`flip.data.datamodule`) reads that layout to tell
a finished run from a killed one, so its names live here, below both.
"""

from __future__ import annotations

import os
import re

__all__ = [
    "CAPTION_EXTENSIONS",
    "CAPTION_MEMBER",
    "IMAGE_EXTENSIONS",
    "IMAGE_MEMBER",
    "IMAGE_SUFFIXES",
    "MARKER",
    "METADATA_EXTENSIONS",
    "METADATA_MEMBER",
    "PART_FILE",
    "REPORT_NAME",
    "STATS_SUFFIX",
    "WANTED_EXTENSIONS",
    "is_image_file",
    "part_tag",
    "split_member_name",
]

# THE list of image formats FLIP reads, lower case, most preferred first: when a sample holds
# several images, readers take the first of these it has
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)  # the same list as file name endings
CAPTION_EXTENSIONS = ("txt", "text", "caption")
METADATA_EXTENSIONS = ("json",)
WANTED_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, *CAPTION_EXTENSIONS, *METADATA_EXTENSIONS))

# what FLIP's own writers (FaceShapes, flip-data) store per sample
IMAGE_MEMBER, CAPTION_MEMBER, METADATA_MEMBER = "jpg", "txt", "json"

# a flip-data output folder: the marker says flip-data may replace its .tar files, each
# NNNNN.tar has a NNNNN_stats.json once finished, and the report is written last
MARKER = ".flip-data"
REPORT_NAME = "report.json"
STATS_SUFFIX = "_stats.json"
# a job split over machines (`flip-data --num-parts N --part K`) writes into one folder, every
# file of part K named `part-0000K-of-0000N-...`; the folder's report.json is then written by
# `flip-data merge-report`, once every part has finished
PART_FILE = re.compile(r"part-(\d{5,})-of-(\d{5,})")

# webdataset's sample key: the member's folder and its file name up to the first dot
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def is_image_file(name: str | os.PathLike) -> bool:
    """Whether a file name ends in one of `IMAGE_EXTENSIONS` (any case)."""
    return os.fspath(name).lower().endswith(IMAGE_SUFFIXES)


def part_tag(index: int, count: int) -> str:
    """`part-0000K-of-0000N`: what every file of part `index` of `count` is named after."""
    return f"part-{index:05d}-of-{count:05d}"


def split_member_name(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a tar member, as webdataset groups members into samples."""
    match = _MEMBER_NAME.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())
