"""Data sources for `flip-data`: each yields `Item`s in a fixed order and counts what it cannot use."""
