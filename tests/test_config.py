"""The OmegaConf resolvers in flip/config.py, as the composed configs use them."""

from __future__ import annotations

import pytest
import torch

import flip.config


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")],
)
def test_cpu_trainer_precision_follows_native_bf16(monkeypatch, train_config, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cfg = train_config("trainer=cpu")
    assert cfg.trainer.precision == expected


def test_explicit_precision_overrides_the_detection(train_config):
    assert train_config("trainer=cpu", "trainer.precision=32-true").trainer.precision == "32-true"


def test_resolvers_register_on_import():
    from omegaconf import OmegaConf

    assert OmegaConf.has_resolver("cpu_precision")
    assert flip.config.cpu_precision() in {"bf16-mixed", "32-true"}
