"""`flip-data curate`: curated shards from shards (duplicates, caption rules, image-text
agreement, MetaCLIP-style balancing), with a report of what each filter removed.

It sits above `flip.evaluation` in the layers because it scores pairs with a model through the
evaluation code's feature extractors; the filters that need no model are in `flip.prepare`
(`caption_rules`, `dedup`, `balance`). The steps: `scan` -> `select` -> flip-data's writer, in
`run.curate`; `report` writes curation.json and its plot.
"""

from flip.curation.run import CurateConfig, curate
from flip.curation.select import Filters

__all__ = ["CurateConfig", "Filters", "curate"]
