"""Evaluation: benchmark protocols (zero-shot, linear probe, retrieval), reports and queries.

runner (what eval/*.py run) -> features (extraction + on-disk cache) -> zeroshot / linear_probe /
retrieval -> report (metrics.json, report.md, plots); query answers questions about images.
"""
