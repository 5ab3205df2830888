"""The eval/*.py entry points' work, one protocol's metrics at a time (flip.cli.evaluate.run runs
every protocol the composed config names and returns their metrics by name)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from flip.cli.evaluate import run


def run_zeroshot(cfg: DictConfig) -> dict[str, Any]:
    return run(cfg)["zeroshot"]


def run_linear_probe(cfg: DictConfig) -> dict[str, Any]:
    return run(cfg)["linear_probe"]


def run_retrieval(cfg: DictConfig) -> dict[str, Any]:
    return run(cfg)["retrieval"]


def run_verification(cfg: DictConfig) -> dict[str, Any]:
    return run(cfg)["verification"]


def run_token_probe(cfg: DictConfig) -> dict[str, Any]:
    return run(cfg)["token_probe"]


def run_parsing_probe(cfg: DictConfig) -> dict[str, Any]:
    return run(cfg)["parsing_probe"]


def run_landmark_probe(cfg: DictConfig) -> dict[str, Any]:
    return run(cfg)["landmark_probe"]
