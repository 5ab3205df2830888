"""Hydra entry points of eval/zeroshot.py, eval/linear_probe.py, eval/token_probe.py,
eval/retrieval.py, eval/verification.py, eval/parsing_probe.py and eval/landmark_probe.py.

Each composes conf/eval_<protocol>.yaml: the evaluation node of conf/eval/default.yaml
(benchmark, split, batch sizes) with one protocol of conf/protocol/, and the model to load.
`run` is what they do with the composed config, apart from the Hydra decorators so tests
(and other programs) can call it with a config they composed themselves. The model is a FLIP
checkpoint (`ckpt=`, a .ckpt or an exported folder) or, for baselines through the same code,
a published model (`baseline.*`, flip.models.baselines): any open_clip architecture with a
pretrained tag or local weights (`baseline.name=ViT-B-16 baseline.pretrained=openai`), FaRL, a
Hugging Face CLIP/SigLIP folder or FLIP-Base (`baseline.format=farl|hf|flip_base baseline.path=...`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from flip.cli import refuse_moved_overrides
from flip.config import CONFIG_PATH, EVAL_SCRIPT_MOVED_KEYS, check_moved_keys_in

if TYPE_CHECKING:  # torch is imported when a model is loaded, not for `--help`
    from flip.models import FlipModel


def load_eval_model(cfg: DictConfig) -> tuple[FlipModel, str, str]:
    """(model in eval mode, cache identity, the name metrics.json records as `checkpoint`)."""
    from flip.evaluation.features import model_identity, resolve_device

    device = resolve_device(cfg.get("device"))
    from flip.models.baselines import BaselineSpec

    spec = BaselineSpec.from_mapping(dict(cfg.get("baseline") or {}))
    if cfg.get("ckpt") and spec.given:
        raise ValueError(f"give either ckpt={cfg.ckpt!r} or a baseline ({spec.label()}), not both")
    if cfg.get("ckpt"):
        from flip.checkpoint import load

        return load(cfg.ckpt, device=device), model_identity(ckpt=cfg.ckpt), str(cfg.ckpt)
    if spec.given:
        from flip.models.baselines import load_baseline

        model = load_baseline(spec).model.to(device).eval()
        if spec.format == "open_clip":  # the cache key it always had
            return model, model_identity(name=spec.name, pretrained=spec.pretrained), spec.label()
        return model, spec.identity(), spec.label()
    raise ValueError(
        "no model to evaluate: give ckpt=PATH (a FLIP .ckpt or exported folder) or a baseline: "
        "baseline.name=ARCH baseline.pretrained=TAG_OR_PATH (open_clip), or "
        "baseline.format=farl|hf|flip_base baseline.path=PATH (docs/models.md)"
    )


def run(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The metrics of every protocol in `cfg.protocols` (by name), written under `cfg.output_dir`."""
    from flip.evaluation.features import FeatureCache
    from flip.evaluation.run import evaluate_config

    check_moved_keys_in(cfg, EVAL_SCRIPT_MOVED_KEYS)
    model, model_id, name = load_eval_model(cfg)
    cache = FeatureCache(cfg.feature_cache_dir) if cfg.get("feature_cache_dir") else None
    return evaluate_config(model, cfg, cfg.output_dir, checkpoint=name, model_id=model_id, cache=cache)


def _main(config_name: str) -> Callable[[], None]:
    """An entry point composing `config_name`; an old key on the command line fails naming the new one."""

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def composed(cfg: DictConfig) -> None:
        run(cfg)

    def main() -> None:
        refuse_moved_overrides(EVAL_SCRIPT_MOVED_KEYS)
        composed()

    return main


zeroshot = _main("eval_zeroshot")
linear_probe = _main("eval_linear_probe")
retrieval = _main("eval_retrieval")
verification = _main("eval_verification")
token_probe = _main("eval_token_probe")
parsing_probe = _main("eval_parsing_probe")
landmark_probe = _main("eval_landmark_probe")
