"""`flip-data`: image collections in the shapes the field publishes -> training shards.

Subcommands (see `flip.cli.data`): `folder` (images + a captions table),
`facecaption15m` (the FaceCaption-15M parquet joined with img2dataset downloads, faces
cropped from their boxes) and `celeba` (CelebA attributes turned into captions). Sources without
boxes can have their faces found (`--detect-faces`: MTCNN, `flip.prepare.detect`; which are
kept: `flip.prepare.faces`) and aligned (`--align`: `flip.prepare.align`); `flip.prepare.samples`
turns a shard's items into samples. Output of img2dataset itself needs no conversion: it trains
as it is.
"""

from flip.prepare.hygiene import REASONS, HygieneConfig, SkipSample
from flip.prepare.writer import ImageRef, Item, JobConfig, run_job

__all__ = ["REASONS", "HygieneConfig", "ImageRef", "Item", "JobConfig", "SkipSample", "run_job"]
