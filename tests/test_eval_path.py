"""The one evaluation path: every caller goes through flip.evaluation.evaluate, a split's features
are extracted once for all protocols, a benchmark or protocol is one module + one YAML, and the
old evaluation keys fail naming the new ones."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from flip.cli.evaluate import run
from flip.config import EVAL_SCRIPT_MOVED_KEYS, check_moved_keys, override_key
from flip.evaluation import features as features_module
from flip.evaluation import run as run_module
from flip.evaluation.benchmark import Benchmark
from flip.evaluation.linear_probe import LinearProbe
from flip.evaluation.retrieval import Retrieval
from flip.evaluation.run import evaluate, evaluate_config
from flip.evaluation.zeroshot import ZeroShot
from flip.training.run import train, validate

from .helpers import CONF, ROOT, SHARDS_BASE, compose_eval, compose_train_config, eval_overrides


@pytest.fixture
def evaluate_calls(monkeypatch) -> list[dict]:
    """Every call of flip.evaluation.run.evaluate: its protocols, split and subsample."""
    calls: list[dict] = []

    def spy(model, benchmark, protocols, output_dir=None, **kwargs):
        calls.append({"protocols": list(protocols), "split": kwargs.get("split"), **kwargs})
        return evaluate(model, benchmark, protocols, output_dir, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", spy)
    return calls


@pytest.mark.slow
def test_eval_scripts_train_py_and_the_callback_all_evaluate_through_one_function(
    train_config, tmp_path, tiny_ckpt, folder_benchmark, evaluate_calls
):
    run(
        compose_eval(
            "eval_zeroshot", tmp_path, *eval_overrides(tmp_path, tiny_ckpt, "folder", folder_benchmark)
        )
    )
    assert [c["protocols"] for c in evaluate_calls] == [["zeroshot"]]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["benchmark"] == "folder"

    evaluate_calls.clear()
    results = train(
        train_config(
            "eval.during_training.every_n_steps=2",
            "eval.during_training.max_samples=16",
            "eval.protocols.linear_probe.max_train=40",
            "eval.protocols.linear_probe.l2_grid=[1.0]",
        )
    )
    during, end = evaluate_calls[:2], evaluate_calls[2:]
    assert [(c["protocols"], c["split"], c["max_samples"]) for c in during] == [(["zeroshot"], "val", 16)] * 2
    assert [(c["protocols"], c["split"]) for c in end] == [(["zeroshot", "linear_probe"], "test")]
    assert results["eval"]["protocol"] == "zeroshot" and results["linear_probe"]["n_train"] == 40
    assert (tmp_path / "run" / "eval" / "linear_probe" / "metrics.json").is_file()


def test_a_split_two_protocols_need_is_extracted_once(tmp_path, tiny_model, csv_benchmark, monkeypatch):
    cfg = compose_eval("eval_zeroshot", tmp_path, "benchmark=csv", f"benchmark.root={csv_benchmark}")
    extracted: list[str] = []
    extract = features_module.extract_image_features

    def counting(model, images, batch_size, num_workers, description, progress):
        extracted.append(description)
        return extract(model, images, batch_size, num_workers, description, progress)

    monkeypatch.setattr(features_module, "extract_image_features", counting)
    protocols = {
        "zeroshot": ZeroShot(),
        "linear_probe": LinearProbe("train", "val", l2_grid=[1.0, 0.01]),
        "retrieval": Retrieval(),
    }
    results = evaluate(tiny_model, cfg.benchmark, protocols, tmp_path / "all", batch_size=7)
    assert extracted == ["csv/test features", "csv/train features", "csv/val features"]
    assert results["linear_probe"]["skipped"] == {"train": {}, "val": {}, "test": {}}
    written = {
        name: json.loads((tmp_path / "all" / sub / "metrics.json").read_text())
        for name, sub in (("zeroshot", ""), ("linear_probe", "linear_probe"), ("retrieval", "retrieval"))
    }
    assert written == json.loads(json.dumps(results))
    # sharing changes no number: each protocol alone gives the same metrics
    for name, protocol in protocols.items():
        alone = evaluate(tiny_model, Benchmark.from_config(cfg.benchmark), {name: protocol}, batch_size=7)
        assert alone[name] == results[name]


@dataclass
class SplitSize:
    """A protocol written for the test: how many images of the evaluated split were read."""

    label: str = "images"

    def __call__(self, model, features, checkpoint=None) -> dict:
        split = features().split
        return {
            "benchmark": split.benchmark,
            "protocol": "split_size",
            "task": split.task,
            "checkpoint": checkpoint,
            "split": split.split,
            "n_train": 0,
            "n_test": len(split),
            "labels": [],
            "summary": {self.label: float(len(split))},
            "per_label": {},
        }


def test_a_new_protocol_and_a_new_benchmark_are_one_yaml_each(tmp_path, tiny_ckpt, folder_benchmark):
    extra = tmp_path / "conf"
    (extra / "protocol").mkdir(parents=True)
    (extra / "benchmark").mkdir()
    (extra / "protocol" / "split_size.yaml").write_text(f"_target_: {__name__}.SplitSize\nlabel: squares\n")
    (extra / "benchmark" / "squares.yaml").write_text(
        "name: squares\nroot: ???\n"
        "reader: {_target_: flip.benchmarks.read_folder, _partial_: true, root: '${..root}'}\n"
        "train_split: train\nval_split: null\ntest_split: test\ntemplates: null\nclasses: null\n"
    )
    search = f"hydra.searchpath=[file://{extra}]"
    overrides = eval_overrides(tmp_path, tiny_ckpt, "squares", folder_benchmark)
    cfg = compose_eval("eval_zeroshot", tmp_path, search, *overrides, "+protocol@protocols.size=split_size")
    results = run(cfg)
    assert cfg.benchmark.name == "squares" and results["zeroshot"]["n_test"] == 12
    assert results["size"]["summary"] == {"squares": 12.0}
    assert json.loads((tmp_path / "out" / "size" / "metrics.json").read_text())["protocol"] == "split_size"
    # train.py composes the same files into its evaluation node
    composed = compose_train_config(
        tmp_path, [search, "benchmark@eval.benchmark=squares", "+protocol@eval.protocols.size=split_size"]
    )
    assert isinstance(instantiate(composed.eval.protocols.size), SplitSize)
    assert composed.eval.benchmark.name == "squares"


def test_every_protocol_yaml_names_a_protocol_that_runs(tmp_path):
    for path in sorted((CONF / "protocol").glob("*.yaml")):
        cfg = compose_eval("eval_base", tmp_path, f"+protocol@protocols.{path.stem}={path.stem}")
        assert callable(instantiate(cfg.protocols[path.stem])), path


# -- old keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "eval.linear_probe.max_train=60",
            "eval.linear_probe.max_train is now eval.protocols.linear_probe.max_train",
        ),
        (
            "eval.linear_probe.l2_grid=[1.0]",
            "eval.linear_probe.l2_grid is now eval.protocols.linear_probe.l2_grid",
        ),
        (
            "eval.linear_probe.enabled=false",
            "eval.linear_probe.enabled is gone: ~eval.protocols.linear_probe",
        ),
        ("eval.root=/data/fs", "eval.root is now eval.benchmark.root"),
        ("eval.val_split=null", "eval.val_split is now eval.protocols.linear_probe.val_split"),
        ("+eval.templates=[a {}]", "eval.templates is now eval.benchmark.templates"),
    ],
)
def test_an_old_train_key_fails_naming_the_new_one(override, message, monkeypatch):
    from flip.cli.train import train as train_py

    monkeypatch.setattr(sys, "argv", ["train.py", "trainer.max_steps=1", override])
    with pytest.raises(SystemExit, match=re.escape(message)):
        train_py()


def test_keys_that_kept_their_names_pass(tmp_path):
    kept = [
        "eval.split=val",
        "eval.batch_size=8",
        "eval.num_workers=0",
        "eval.during_training.every_n_steps=5",
    ]
    kept += ["eval.test_shards=null", "benchmark@eval.benchmark=celeba", "evaluate=false", "-m"]
    check_moved_keys(override_key(o) for o in kept)
    cfg = compose_train_config(tmp_path, [k for k in kept if k != "-m"])
    assert (cfg.eval.split, cfg.eval.batch_size, cfg.eval.during_training.every_n_steps) == ("val", 8, 5)
    new = ["eval.protocols.linear_probe.max_train=60", "eval.protocols.linear_probe.seed=3"]
    cfg = compose_train_config(tmp_path, [*new, "eval.benchmark.root=/data/fs"])
    probe = cfg.eval.protocols.linear_probe
    assert (probe.max_train, probe.seed, cfg.eval.benchmark.root) == (60, 3, "/data/fs")
    off = compose_train_config(tmp_path, ["~eval.protocols.linear_probe"])
    assert list(off.eval.protocols) == ["zeroshot"]


def test_old_keys_in_a_config_file_fail_naming_the_new_key(tmp_path, tiny_ckpt, folder_benchmark):
    cfg = compose_train_config(tmp_path, ["+eval.linear_probe.max_train=5"])  # as an experiment file sets it
    with pytest.raises(ValueError, match=r"eval\.linear_probe is now eval\.protocols\.linear_probe"):
        validate(cfg)
    overrides = eval_overrides(tmp_path, tiny_ckpt, "folder", folder_benchmark)
    with pytest.raises(ValueError, match=r"probe is now protocols\.linear_probe"):
        run(compose_eval("eval_linear_probe", tmp_path, *overrides, "+probe.seed=1"))


def test_old_eval_script_keys_fail_naming_the_new_ones(tmp_path, monkeypatch):
    old = ["probe.fractions=[0.5]", "val_split=null", "max_train=10", "max_val=4", "train_split=x"]
    for override in old:
        key = override_key(override)
        new = "protocols.linear_probe." + key.removeprefix("probe.")
        with pytest.raises(ValueError, match=re.escape(f"{key} is now {new}")):
            check_moved_keys([key], EVAL_SCRIPT_MOVED_KEYS)
    kept = ["max_samples=5", "seed=1", "split=val", "batch_size=8", "baseline.name=ViT-B-16"]
    kept += ["baseline.pretrained=openai", "baseline.cache_dir=/c", "protocols.linear_probe.max_train=10"]
    check_moved_keys((override_key(o) for o in kept), EVAL_SCRIPT_MOVED_KEYS)
    cfg = compose_eval("eval_linear_probe", tmp_path, "benchmark=celeba", "benchmark.root=/x", *kept)
    assert {k: v for k, v in cfg.baseline.items() if v is not None} == {
        "name": "ViT-B-16",
        "pretrained": "openai",
        "cache_dir": "/c",
    }
    assert cfg.protocols.linear_probe.max_train == 10 and cfg.max_samples == 5
    from flip.cli.evaluate import linear_probe as linear_probe_py

    monkeypatch.setattr(sys, "argv", ["eval/linear_probe.py", "probe.seed=3"])
    with pytest.raises(SystemExit, match=re.escape("probe.seed is now protocols.linear_probe.seed")):
        linear_probe_py()


@pytest.mark.slow
def test_eval_script_command_line_names_the_new_key(tmp_path):
    command = [sys.executable, "eval/linear_probe.py", "ckpt=x", "probe.l2_grid=[1.0]"]
    env = {**os.environ, "FLIP_ROOT": str(tmp_path)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "probe.l2_grid is now protocols.linear_probe.l2_grid" in done.stderr


# -- which data train.py evaluates ------------------------------------------------------------------


def test_the_demo_evaluates_the_faceshapes_it_generates(tmp_path):
    cfg = compose_train_config(tmp_path, ["data.root=" + str(tmp_path / "elsewhere")])
    assert cfg.eval.benchmark.root == str(tmp_path / "elsewhere") == cfg.data.root
    validate(cfg)  # not generated yet, and that is fine: the run generates it


def test_train_py_refuses_before_training_an_evaluation_it_cannot_read(tmp_path, caption_shards):
    shards = ["evaluate=true", f"data.train_shards={caption_shards[0]}"]
    cfg = compose_train_config(tmp_path, shards, base=SHARDS_BASE)
    with pytest.raises(
        ValueError, match=r"faceshapes/test.*eval\.benchmark\.root=.*cannot be read.*test_shards"
    ):
        validate(cfg)
    demo = [o for o in SHARDS_BASE if o != "~experiment"]  # ${data.root}: shards have none
    with_demo = compose_train_config(tmp_path, shards, base=demo)
    with pytest.raises(ValueError, match=r"eval\.benchmark\.root=None cannot be read"):
        validate(with_demo)
    validate(
        compose_train_config(tmp_path, [*shards, f"eval.test_shards={caption_shards[0]}"], base=SHARDS_BASE)
    )


def test_test_shards_are_read_as_the_evaluated_split(train_config, tmp_path, tiny_model):
    cfg = train_config("~eval.protocols.linear_probe")
    instantiate(cfg.data).ensure()
    direct = evaluate_config(tiny_model, cfg.eval)["zeroshot"]
    with open_dict(cfg):
        cfg.eval.test_shards = str(tmp_path / "data" / "faceshapes" / "test")
    from_shards = evaluate_config(tiny_model, cfg.eval)["zeroshot"]
    assert from_shards["per_label"] == direct["per_label"] and from_shards["n_test"] == 64
    assert from_shards["retrieval"] == pytest.approx(direct["retrieval"])
