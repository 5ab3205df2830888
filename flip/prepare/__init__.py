"""`flip-data`: image collections in the shapes the field publishes -> training shards.

Subcommands (see `flip.cli.data`): `folder` (images + a captions table),
`facecaption15m` (the FaceCaption-15M parquet joined with img2dataset downloads, faces
cropped from their boxes) and `celeba` (CelebA attributes turned into captions). Sources without
boxes can have their faces found (`--detect-faces`: MTCNN, `flip.prepare.detect`; which are
kept: `flip.prepare.faces`) and aligned (`--align`: `flip.prepare.align`); `flip.prepare.samples`
turns a shard's items into samples. Output of img2dataset itself needs no conversion: it trains
as it is. Any of them can be split over machines (`Part`, `--num-parts N --part K`) and the
parts' reports merged (`merge_reports`). `flip-data curate` runs in
`flip.curation` (it scores pairs with a model); its filters that need none are here:
`dedup`, `caption_rules`, `balance`.
"""

from flip.prepare.hygiene import REASONS, HygieneConfig, SkipSample
from flip.prepare.merge import merge_reports
from flip.prepare.parts import Part
from flip.prepare.writer import ImageRef, Item, JobConfig, run_job

__all__ = [
    "REASONS",
    "HygieneConfig",
    "ImageRef",
    "Item",
    "JobConfig",
    "Part",
    "SkipSample",
    "merge_reports",
    "run_job",
]
