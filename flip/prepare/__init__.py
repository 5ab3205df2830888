"""`flip-data`: image collections in the shapes the field publishes -> training shards.

Subcommands (see `flip.cli.data`): `folder` (images + a captions table),
`facecaption15m` (the FaceCaption-15M parquet joined with img2dataset downloads, faces
cropped from their boxes) and `celeba` (CelebA attributes turned into captions). Output of
img2dataset itself needs no conversion: it trains as it is. `flip-data curate` runs in
`flip.curation` (it scores pairs with a model); its filters that need none are here:
`dedup`, `caption_rules`, `balance`.
"""

from flip.prepare.hygiene import REASONS, HygieneConfig, SkipSample
from flip.prepare.writer import ImageRef, Item, JobConfig, run_job

__all__ = ["REASONS", "HygieneConfig", "ImageRef", "Item", "JobConfig", "SkipSample", "run_job"]
