"""eval/suite.py: many models x benchmarks x protocols through the one evaluation path, one
leaderboard; features extracted once per (model, benchmark, split); resumable after a kill;
a failing cell reported without stopping the others; fine-tune runs read into rows labelled by
their adaptation; two leaderboards compared."""

from __future__ import annotations

import copy
import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from flip.cli import evaluate as evaluate_module
from flip.cli import suite as suite_module
from flip.cli.evaluate import run as run_eval_script
from flip.cli.suite import run
from flip.evaluation import features as features_module
from flip.evaluation import run as run_module
from flip.evaluation.leaderboard import CellResult, Leaderboard, headline_metrics
from flip.export import export
from flip.models import register_architecture
from flip.training.finetune.run import finetune

from .helpers import ROOT, TINY_ARCH, compose_eval, compose_finetune_config, flip_root_env
from .helpers.paths import CONF

QUICKGELU_TINY = "flip-test-tiny-quickgelu"
SPLITS = ("train", "val", "test")
# the demo suite at test size: one probe per cell instead of a sweep
SMALL_PROBE = (
    "suite.benchmarks.0.overrides="
    "['protocols.linear_probe.fractions=[1.0]','protocols.linear_probe.l2_grid=[0.1]']"
)


def compose_suite(tmp_path: Path, models: list[dict], *overrides: str, suite: str = "demo") -> DictConfig:
    """conf/eval_suite.yaml with `suite`, as eval/suite.py composes it, the models set, and
    everything written under tmp_path."""
    small = [SMALL_PROBE] if suite == "demo" else []
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="eval_suite",
            overrides=[f"suite={suite}", "num_workers=0", "batch_size=32", *small, *overrides],
        )
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.suite.models = models
    return cfg


@pytest.fixture(scope="module")
def suite_models(trained_demo, tmp_path_factory) -> dict:
    """The demo checkpoint, its open_clip export, and a random model saved in OpenAI's layout."""
    folder = tmp_path_factory.mktemp("suite_models")
    export(trained_demo.ckpt, folder / "open_clip", "open_clip")
    register_architecture(QUICKGELU_TINY, {**copy.deepcopy(TINY_ARCH), "quick_gelu": True})
    torch.manual_seed(3)
    clip = open_clip.create_model(QUICKGELU_TINY)
    torch.save({"state_dict": clip.state_dict()}, folder / "openai_layout.pth")
    return {
        "demo": {"name": "demo", "ckpt": str(trained_demo.ckpt)},
        "export": {"name": "demo-open_clip", "baseline": {"name": f"local-dir:{folder / 'open_clip'}"}},
        "random": {
            "name": "random-openai",
            "baseline": {"format": "farl", "name": QUICKGELU_TINY, "path": str(folder / "openai_layout.pth")},
        },
    }


def _faceshapes(trained_demo) -> str:
    return f"suite.data_root={trained_demo.faceshapes.parent}"


def _hydra_model(model: dict) -> str:
    """A model entry as a Hydra command-line value: {name:N,ckpt:'PATH'} or {name:N,baseline:{name:'X'}}."""
    if "ckpt" in model:
        return f"{{name:{model['name']},ckpt:'{model['ckpt']}'}}"
    return f"{{name:{model['name']},baseline:{{name:'{model['baseline']['name']}'}}}}"


def _done(out: Path) -> list[Path]:
    """metrics.json of the finished cells (not of the hidden folders cells are computed in)."""
    return [p for p in out.glob("cells/*/*/*/metrics.json") if not p.parent.name.startswith(".")]


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def three_models(trained_demo, suite_models, tmp_path_factory) -> dict:
    """The demo suite run on the three models, uninterrupted, counting model loads and extractions."""
    tmp_path = tmp_path_factory.mktemp("three_models")
    extracted: list[tuple[int, str]] = []
    loads: list[str] = []
    extract, load = features_module.extract_image_features, evaluate_module.load_eval_model

    def counting(model, images, *args, **kwargs):
        extracted.append((id(model), args[2]))  # the description names benchmark/split
        return extract(model, images, *args, **kwargs)

    def counting_load(cfg):
        loads.append(cfg.ckpt or cfg.baseline.get("name"))
        return load(cfg)

    models = [suite_models[k] for k in ("demo", "export", "random")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features_module, "extract_image_features", counting)
        patch.setattr(evaluate_module, "load_eval_model", counting_load)
        cfg = compose_suite(tmp_path, models, _faceshapes(trained_demo), f"output_dir={tmp_path / 'out'}")
        board = run(cfg)
    return {"out": tmp_path / "out", "board": board, "loads": loads, "extracted": extracted}


def test_three_models_give_one_leaderboard_each_split_extracted_once(trained_demo, three_models, tmp_path):
    out, board, loads, extracted = (three_models[k] for k in ("out", "board", "loads", "extracted"))
    assert len(loads) == 3  # each model loaded once for its three cells
    # one extraction per (model, split): zero-shot, probe and retrieval share them
    assert sorted(d for _, d in extracted) == sorted(
        f"faceshapes/{s} features" for s in SPLITS for _ in range(3)
    )
    assert len(set(extracted)) == len(extracted)

    rows = _csv_rows(out / "leaderboard.csv")
    header = rows[0]
    assert header == [
        "model",
        "faceshapes/zeroshot/mean_accuracy",
        "faceshapes/zeroshot/mean_balanced_accuracy",
        "faceshapes/linear_probe/mean_accuracy",
        "faceshapes/linear_probe/mean_balanced_accuracy",
        *(f"faceshapes/retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5)),
    ]
    assert [r[0] for r in rows[1:]] == ["demo", "demo-open_clip", "random-openai"]
    assert rows[1][1:] == rows[2][1:]  # the export is the model: the same row
    assert rows[1][1:] != rows[3][1:]

    # each value is the cell's metrics.json, and the cell is what eval/zeroshot.py computes
    for model, row in zip(["demo", "demo-open_clip", "random-openai"], rows[1:], strict=True):
        for column, text in zip(header[1:], row[1:], strict=True):
            bench, protocol, metric = column.split("/")
            cell = json.loads((out / "cells" / model / bench / protocol / "metrics.json").read_text())
            assert float(text) == cell["summary"][metric]
            assert board.values[model][column] == cell["summary"][metric]
    alone = compose_eval(
        "eval_zeroshot",
        tmp_path,
        f"ckpt={trained_demo.ckpt}",
        f"benchmark.root={trained_demo.faceshapes}",
        f"output_dir={tmp_path / 'alone'}",
        "feature_cache_dir=null",
        "num_workers=0",
    )
    expected = run_eval_script(alone)["zeroshot"]
    cell = json.loads((out / "cells" / "demo" / "faceshapes" / "zeroshot" / "metrics.json").read_text())
    assert cell["summary"] == expected["summary"] and cell["per_label"] == expected["per_label"]
    assert (out / "cells" / "demo" / "faceshapes" / "zeroshot" / "report.md").is_file()

    # CLIP_benchmark's files: one flat folder, the retrieval cells only (attributes it cannot express)
    files = sorted(p.name for p in (out / "clip_benchmark").iterdir())
    assert files == sorted(
        f"faceshapes_{tag}_{model}_en_zeroshot_retrieval.json"
        for model, tag in [
            ("demo", "last"),
            ("demo-open_clip", "open_clip"),
            ("random-openai", "openai_layout"),
        ]
    ), files
    for model in ("demo", "demo-open_clip", "random-openai"):
        (path,) = (out / "clip_benchmark").glob(f"*_{model}_en_*.json")
        record = json.loads(path.read_text())
        cell = json.loads((out / "cells" / model / "faceshapes" / "retrieval" / "metrics.json").read_text())
        assert record["model"] == model and record["task"] == "zeroshot_retrieval"
        assert record["metrics"]["image_retrieval_recall@5"] == cell["summary"]["t2i_R@5"]

    markdown = (out / "leaderboard.md").read_text()
    best = max(float(r[1]) for r in rows[1:])
    assert f"**{best:.4f}**" in markdown and "Failed cells" not in markdown
    assert (out / "leaderboard.png").stat().st_size > 0


def test_a_failing_cell_is_reported_and_the_others_complete(trained_demo, tmp_path, folder_benchmark):
    missing = tmp_path / "not_there"
    benchmarks = [
        {"benchmark": "folder", "root": str(missing), "protocols": ["zeroshot"]},
        {
            "benchmark": "faceshapes",
            "root": str(trained_demo.faceshapes),
            "protocols": ["zeroshot", "verification"],
        },
        {"benchmark": "faceshapes", "name": "faceshapes_natural", "root": str(trained_demo.faceshapes)},
    ]
    models = [
        {"name": "demo", "ckpt": str(trained_demo.ckpt)},
        {"name": "gone", "ckpt": str(tmp_path / "gone.ckpt")},
    ]
    cfg = compose_suite(tmp_path, models, f"output_dir={tmp_path / 'out'}")
    with open_dict(cfg):
        cfg.suite.benchmarks = benchmarks
        cfg.suite.benchmarks[2].overrides = ["protocols.linear_probe.l2_grid=[1.0]"]
    board = run(cfg)
    cells = tmp_path / "out" / "cells" / "demo"
    assert sorted(
        str(p.relative_to(cells).parent) for p in cells.rglob("*.json") if p.parent.name != "out"
    ) == [
        "faceshapes/verification",
        "faceshapes/zeroshot",
        "faceshapes_natural/linear_probe",  # the natural protocols of an attribute benchmark
        "faceshapes_natural/zeroshot",
        "folder/zeroshot",
    ]
    assert not (cells / "folder" / "zeroshot" / "metrics.json").exists()
    error = json.loads((cells / "folder" / "zeroshot" / "error.json").read_text())["error"]
    assert str(missing) in error
    row = _csv_rows(tmp_path / "out" / "leaderboard.csv")[1]
    values = dict(zip(_csv_rows(tmp_path / "out" / "leaderboard.csv")[0], row, strict=True))
    assert values["folder/zeroshot"] == "error" and values["faceshapes/verification"] == "error"
    assert (
        float(values["faceshapes/zeroshot/mean_accuracy"])
        == board.values["demo"]["faceshapes/zeroshot/mean_accuracy"]
    )
    assert float(values["faceshapes_natural/linear_probe/mean_accuracy"]) > 0
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    assert f"- demo / folder/zeroshot: {error}" in markdown
    assert "- demo / faceshapes/verification: " in markdown
    # a model that does not load fails its own cells only
    assert set(board.values["gone"].values()) == {"error"} and len(board.values["gone"]) == len(board.columns)
    assert "- gone / faceshapes/zeroshot: the model did not load: " in markdown and "gone.ckpt" in markdown

    # the data arrives: a rerun computes the failed cell and leaves the done ones alone
    done = {p: p.stat().st_mtime_ns for p in cells.rglob("metrics.json")}
    shutil.copytree(folder_benchmark, missing)
    with open_dict(cfg):  # and one cell's settings changed: that cell is computed again
        cfg.suite.benchmarks[2].overrides = ["protocols.linear_probe.l2_grid=[0.1]"]
    run(cfg)
    changed = cells / "faceshapes_natural" / "linear_probe" / "metrics.json"
    assert changed.stat().st_mtime_ns > done.pop(changed)
    assert json.loads(changed.read_text())["l2"] == 0.1
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert (cells / "folder" / "zeroshot" / "metrics.json").is_file()
    assert not (cells / "folder" / "zeroshot" / "error.json").exists()


def test_faces_core_without_its_data_reports_every_cell_naming_its_folder(tiny_ckpt, tmp_path):
    nodata = tmp_path / "nodata"
    cfg = compose_suite(
        tmp_path,
        [{"name": "tiny", "ckpt": str(tiny_ckpt)}],
        f"suite.data_root={nodata}",
        f"output_dir={tmp_path / 'out'}",
        suite="faces_core",
    )
    board = run(cfg)
    natural = ["zeroshot", "linear_probe"]
    assert board.columns == [
        *(f"{b}/{p}" for b in ("celeba", "lfwa") for p in [*natural, "token_probe"]),
        *(f"{b}/{p}" for b in ("rafdb", "fer2013", "affectnet", "fairface", "utkface") for p in natural),
        "lfw/verification",
        "celeba_caption/retrieval",
    ]
    assert set(board.values["tiny"].values()) == {"error"}
    unnamed = [f"{e.column}: {e.error}" for e in board.errors if str(nodata) not in e.error]
    assert not unnamed, "errors that do not name the missing folder:\n" + "\n".join(unnamed)


def test_a_killed_suite_resumes_without_recomputing_and_gives_the_same_table(
    trained_demo, suite_models, three_models, tmp_path, monkeypatch
):
    models = [suite_models["demo"], suite_models["export"]]
    flat = ",".join(_hydra_model(m) for m in models)
    killed = tmp_path / "killed"
    args = [
        "suite=demo",
        f"suite.models=[{flat}]",
        _faceshapes(trained_demo),
        f"output_dir={killed}",
        f"feature_cache_dir={tmp_path / 'cache_killed'}",
        "num_workers=0",
        "batch_size=32",
        SMALL_PROBE,
    ]
    process = subprocess.Popen(
        [sys.executable, "eval/suite.py", *args],
        cwd=ROOT,
        env=flip_root_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while not _done(killed):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no cell finished in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    done = {p: p.stat().st_mtime_ns for p in _done(killed)}
    assert 0 < len(done) < 6, "the kill came too late to test resuming"
    assert (killed / ".hydra" / "config.yaml").is_file()
    assert not (killed / "leaderboard.csv").exists()
    # nothing half-written looks finished: every cell folder is complete or absent
    for cell in killed.glob("cells/*/*/*"):
        assert cell.name.startswith(".") or (cell / "metrics.json").is_file(), cell

    computed = []
    evaluate_config = run_module.evaluate_config

    def counting(model, cfg, output_dir=None, **kwargs):
        computed.append(Path(output_dir).parent.name + "/" + Path(output_dir).name)
        return evaluate_config(model, cfg, output_dir, **kwargs)

    monkeypatch.setattr(run_module, "evaluate_config", counting)
    common = [_faceshapes(trained_demo), f"feature_cache_dir={tmp_path / 'cache_killed'}"]
    run(compose_suite(tmp_path, models, *common, f"output_dir={killed}"))
    assert len(computed) == 6 - len(done)
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert not list(killed.glob("cells/*/*/.*"))  # no partial folder left

    # the table is the uninterrupted run's (that of three models: its first two rows)
    assert _csv_rows(killed / "leaderboard.csv") == _csv_rows(three_models["out"] / "leaderboard.csv")[:3]


@pytest.fixture(scope="module")
def finetuned_demo(trained_demo, tmp_path_factory) -> dict[str, Path]:
    """Real finetune.py runs of the demo checkpoint, two steps each: LoRA r=4 with EMA, full, frozen."""
    runs = {}
    for name, adapt in (
        ("lora", ["adapt=lora", "adapt.rank=4", "ema.decay=0.5"]),
        ("full", ["adapt=full"]),
        ("frozen", ["adapt=frozen"]),
    ):
        folder = tmp_path_factory.mktemp(f"finetune_{name}")
        common = [
            f"ckpt={trained_demo.ckpt}",
            f"benchmark.root={trained_demo.faceshapes}",
            "trainer.max_steps=2",
        ]
        finetune(compose_finetune_config(folder, [*common, *adapt]))
        runs[name] = folder / "run"
    return runs


def test_fine_tune_runs_are_rows_labelled_by_adaptation_beside_the_probes(
    trained_demo, finetuned_demo, tmp_path
):
    runs = finetuned_demo
    stopped = tmp_path / "stopped"  # a fine-tune that has not evaluated yet: the full run without eval/
    shutil.copytree(runs["full"], stopped, ignore=shutil.ignore_patterns("eval"))
    finetunes = [
        {"name": "demo-lora", "run": str(runs["lora"])},
        {"name": "demo-full", "run": str(runs["full"])},
        {"name": "demo-frozen", "run": str(runs["frozen"])},
        {"name": "stopped", "run": str(stopped)},
        {"name": "pretrained", "run": str(trained_demo.run)},  # train.py's run: a zero-shot eval/
        {"name": "nowhere", "run": str(tmp_path / "nowhere")},
    ]
    out = tmp_path / "out"
    cfg = compose_suite(
        tmp_path,
        [{"name": "demo", "ckpt": str(trained_demo.ckpt)}],
        _faceshapes(trained_demo),
        f"output_dir={out}",
        "suite.benchmarks.0.protocols=[zeroshot]",
        suite="finetunes",
    )
    with open_dict(cfg):
        cfg.suite.finetunes = finetunes
    board = run(cfg)

    rows = _csv_rows(out / "leaderboard.csv")
    header = rows[0]
    tuned = [f"faceshapes/finetune/{m}" for m in ("mean_accuracy", "mean_balanced_accuracy")]
    assert header == [
        "model",
        "faceshapes/zeroshot/mean_accuracy",
        "faceshapes/zeroshot/mean_balanced_accuracy",
        *tuned,
        "finetune/run",  # where the runs without results show their error
    ]
    table = {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in rows[1:]}
    sources = {
        "demo-lora · LoRA r=4": runs["lora"] / "eval" / "metrics.json",
        "demo-lora · LoRA r=4 (EMA)": runs["lora"] / "eval_ema" / "metrics.json",
        "demo-full · full": runs["full"] / "eval" / "metrics.json",
        "demo-frozen · frozen": runs["frozen"] / "eval" / "metrics.json",
    }
    assert list(table) == ["demo", *sources, "stopped", "pretrained", "nowhere"]
    for row, path in sources.items():  # each value is the run's own metrics.json, not recomputed
        metrics = json.loads(path.read_text())
        for column in tuned:
            assert float(table[row][column]) == metrics["summary"][column.split("/")[-1]], (row, column)
        assert table[row]["faceshapes/zeroshot/mean_accuracy"] == ""
    assert {row: board.sources[row] for row in sources} == {row: str(p) for row, p in sources.items()}
    zeroshot = json.loads((out / "cells" / "demo" / "faceshapes" / "zeroshot" / "metrics.json").read_text())
    assert float(table["demo"]["faceshapes/zeroshot/mean_accuracy"]) == zeroshot["summary"]["mean_accuracy"]
    assert table["demo"][tuned[0]] == ""

    errors = {e.model: e.error for e in board.errors}
    assert set(errors) == {"stopped", "pretrained", "nowhere"}
    assert {table[row]["finetune/run"] for row in errors} == {"error"}
    assert errors["stopped"].startswith(
        f"{stopped / 'eval' / 'metrics.json'} does not exist: the fine-tune is"
    )
    assert "evaluate=false" in errors["stopped"]
    assert (
        f"holds protocol 'zeroshot', not 'finetune': {trained_demo.run} is not a finetune.py run"
        in (errors["pretrained"])
    )
    assert errors["nowhere"].startswith(f"{tmp_path / 'nowhere'} does not exist: `run` must be a finetune.py")
    markdown = (out / "leaderboard.md").read_text()
    assert "| demo-lora · LoRA r=4 (EMA) |" in markdown and "| demo-frozen · frozen |" in markdown
    for row, error in errors.items():
        assert f"- {row} / finetune/run: {error}" in markdown
    for row, path in sources.items():
        assert f"- {row}: `{path}`" in markdown
    assert not (out / "cells" / "demo-lora").exists()  # nothing computed for a fine-tune

    # a rerun reads the same table; once the stopped run has evaluated, its row is read too
    before = (out / "leaderboard.csv").read_text()
    run(cfg)
    assert (out / "leaderboard.csv").read_text() == before
    shutil.copytree(runs["full"] / "eval", stopped / "eval")
    again = run(cfg)
    assert "stopped · full" in again.models and "stopped" not in again.models
    assert again.values["stopped · full"] == again.values["demo-full · full"]


def test_a_suite_of_fine_tunes_only_loads_no_model(finetuned_demo, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "load_eval_model", None)  # a model load would fail
    cfg = compose_suite(tmp_path, [], f"output_dir={tmp_path / 'out'}", suite="finetunes")
    with open_dict(cfg):
        cfg.suite.benchmarks = []
        cfg.suite.finetunes = [{"name": "demo", "run": str(finetuned_demo["full"])}]
    board = run(cfg)
    metrics = json.loads((finetuned_demo["full"] / "eval" / "metrics.json").read_text())
    assert board.models == ["demo · full"] and not board.errors
    assert board.values["demo · full"] == {
        f"faceshapes/finetune/{k}": metrics["summary"][k] for k in ("mean_accuracy", "mean_balanced_accuracy")
    }
    assert not list((tmp_path / "out" / "clip_benchmark").iterdir())
    with open_dict(cfg):
        cfg.suite.finetunes = []
    with pytest.raises(ValueError, match=r"or fine-tune runs \(suite.finetunes\), or both; got 0 model"):
        run(cfg)


@pytest.mark.parametrize(
    ("finetunes", "error"),
    [
        ([{"name": "demo", "run": "/r"}], r"suite.finetunes\[0\].name='demo' is taken"),
        ([{"name": "a", "run": "/r"}, {"name": "a", "run": "/s"}], r"suite.finetunes\[1\].name='a' is taken"),
        ([{"name": "a b", "run": "/r"}], r"suite.finetunes\[0\] needs a name of letters"),
        ([{"name": "a"}], r"suite.finetunes\[0\] \(a\) needs `run`: the folder finetune.py wrote"),
    ],
)
def test_a_wrong_finetunes_entry_fails_before_any_model_loads(tmp_path, finetunes, error):
    cfg = compose_suite(tmp_path, [{"name": "demo", "ckpt": "/no/model"}], suite="finetunes")
    with open_dict(cfg):
        cfg.suite.finetunes = finetunes
    with pytest.raises(ValueError, match=error):
        suite_module.plan(cfg)


def _board(values: dict[str, dict]) -> Leaderboard:
    cells = [
        CellResult(model, "utkface", "zeroshot", metrics={"task": "multitask", "summary": summary})
        for model, summary in values.items()
    ]
    return Leaderboard.from_cells(cells, list(values))


def test_headlines_best_per_column_and_compare(tmp_path, capsys, monkeypatch):
    summary = {"gender_accuracy": 0.9, "gender_mean_per_class_recall": 0.8, "age_mae": 6.0, "age_cs5": 0.5}
    assert headline_metrics({"task": "multitask", "summary": summary}) == {
        "gender_accuracy": 0.9,
        "age_mae": 6.0,
    }
    assert headline_metrics({"task": "verification", "summary": {"accuracy_mean": 0.7, "roc_auc": 0.8}}) == {
        "accuracy_mean": 0.7
    }
    a = _board({"m1": summary, "m2": {**summary, "gender_accuracy": 0.95, "age_mae": 7.5}})
    markdown = a.markdown()
    assert "| m1 | 0.9000 | **6.0000** |" in markdown  # the lower MAE is the better
    assert "| m2 | **0.9500** | 7.5000 |" in markdown
    b = _board(
        {"m1": {**summary, "age_mae": 5.5}, "m2": {**summary, "gender_accuracy": 0.95, "age_mae": 7.5}}
    )
    b.values["m3"] = {"utkface/zeroshot/age_mae": "error"}
    b.models.append("m3")
    a.write(tmp_path / "a")
    b.write(tmp_path / "b")

    argv = [
        "eval/suite.py",
        "--compare",
        str(tmp_path / "a" / "leaderboard.csv"),
        str(tmp_path / "b" / "leaderboard.csv"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_code:
        suite_module.main()
    assert exit_code.value.code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"2 cell(s) differ: A = {argv[2]}, B = {argv[3]}"
    assert printed[4:] == [
        "| m1 | utkface/zeroshot/age_mae | 6.0 | 5.5 | -0.5000 |",
        "| m3 | utkface/zeroshot/age_mae | - | error |  |",
    ]

    monkeypatch.setattr(sys, "argv", [*argv[:3], str(tmp_path / "none.csv")])
    with pytest.raises(SystemExit) as exit_code:
        suite_module.main()
    assert exit_code.value.code == 2 and "none.csv" in capsys.readouterr().err
