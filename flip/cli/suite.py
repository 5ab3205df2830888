"""`python eval/suite.py suite=NAME`: every model of a suite on every benchmark, one leaderboard.

conf/eval_suite.yaml + conf/suite/<name>.yaml list the models (each a FLIP checkpoint or a
baseline, as eval/*.py take them) and the benchmarks with their protocols. A cell (model,
benchmark, protocol) is evaluated exactly as eval/<protocol>.py would evaluate it: its config is
composed from conf/eval_base.yaml with the benchmark's overrides, and run through
flip.evaluation.run.evaluate_config. Each model is loaded once for all its cells and freed
before the next; a (model, benchmark, split)'s features are extracted once into the feature
cache, which every protocol and a resumed run read.

A cell is computed in a hidden folder renamed onto OUT/cells/<model>/<benchmark>/<protocol>/
when complete, so a cell folder with metrics.json is done and a rerun skips it; a killed run
leaves nothing that looks finished. A cell that fails (its data missing, a protocol its task
does not have) writes error.json there instead, is retried on the next run, and does not stop
the others. `suite.finetunes` lists finetune.py runs, whose own evaluation (eval/metrics.json,
eval_ema/metrics.json) is read into rows labelled by their adaptation, beside the models' cells
(flip.evaluation.finetune_runs). `python eval/suite.py --compare A.csv B.csv` prints where two
leaderboards differ.
"""

from __future__ import annotations

import argparse
import gc
import logging
import re
import shutil
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from flip.atomic import write_json_atomic
from flip.config import CONFIG_PATH, override_key
from flip.evaluation.leaderboard import (
    CellResult,
    Leaderboard,
    compare_leaderboards,
    comparison_markdown,
    read_cell,
    read_leaderboard_csv,
)

log = logging.getLogger(__name__)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # a folder name on any filesystem
PARTIAL = ".partial"
CELL_CONFIG = "config.yaml"  # the cell's model entry and eval/<protocol>.py config
IRRELEVANT = ("batch_size", "num_workers")  # settings that do not change a cell's metrics


@dataclass
class SuiteBenchmark:
    """A benchmark of the suite: its protocols' eval configs, or why they could not be chosen."""

    name: str
    cells: dict[str, DictConfig] = field(default_factory=dict)  # protocol -> eval/*.py config
    error: str | None = None


def _check_name(kind: str, name: Any, index: int) -> str:
    names = {
        "models": "a folder under cells/ and a leaderboard row",
        "finetunes": "the leaderboard rows of its run",
    }.get(kind, "a folder under cells/ and a leaderboard column")
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise ValueError(
            f"suite.{kind}[{index}] needs a name of letters, digits, '.', '_', '+' or '-' (it names "
            f"{names}); got {name!r}"
        )
    return name


@contextmanager
def _hydra_compose() -> Iterator[None]:
    """Compose from conf/ inside eval/suite.py's Hydra app, or set it up for a caller without one."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        yield


def cell_config(cfg: DictConfig, entry: DictConfig, protocol: str) -> DictConfig:
    """What eval/<protocol>.py composes for this benchmark entry (conf/eval_base.yaml, the
    protocol, the suite's batch settings, then the entry's own overrides, less those of its
    other protocols), resolved."""
    own = [
        o
        for o in entry.get("overrides") or []
        if not override_key(o).startswith("protocols.")
        or override_key(o).startswith(f"protocols.{protocol}.")
    ]
    overrides = [
        f"benchmark={entry.benchmark}",
        f"+protocol@protocols.{protocol}={protocol}",
        f"batch_size={cfg.batch_size}",
        f"num_workers={cfg.num_workers}",
        *own,
    ]
    composed = compose(config_name="eval_base", overrides=overrides)
    node = OmegaConf.create({"paths": cfg.paths, "eval": {}})
    for key in (
        "benchmark",
        "protocols",
        "split",
        "max_samples",
        "seed",
        "test_shards",
        "batch_size",
        "num_workers",
    ):
        node.eval[key] = composed.get(key)
    if entry.get("root") is not None:
        node.eval.benchmark.root = str(entry.root)
    return OmegaConf.create(OmegaConf.to_container(node.eval, resolve=True))


def natural_protocols(cfg: DictConfig, node: DictConfig) -> list[str]:
    """The protocols of an entry that lists none: by the task of its evaluated split (`node`:
    any of its cell configs)."""
    from flip.evaluation.benchmark import Benchmark

    benchmark = Benchmark.from_config(node.benchmark)
    split = benchmark.load(node.split or benchmark.test_split)
    labelled = split.task != "multitask" or split.questions or split.values
    task = split.task if labelled or split.captions is None else "captions"
    return list(cfg.natural_protocols[task])


def plan(cfg: DictConfig) -> tuple[list[DictConfig], list[SuiteBenchmark]]:
    """The suite's models and benchmarks; a config error (an unknown benchmark or protocol, a
    duplicate name) fails here, before any model loads."""
    models = list(cfg.suite.models or [])
    entries = list(cfg.suite.benchmarks or [])
    runs = list(cfg.suite.get("finetunes") or [])
    if bool(models) != bool(entries) or not (models or runs):
        raise ValueError(
            "a suite needs at least one model (suite.models) and one benchmark (suite.benchmarks), "
            "or fine-tune runs (suite.finetunes), or both; got "
            f"{len(models)} model(s), {len(entries)} benchmark(s), {len(runs)} run(s)"
        )
    names = [_check_name("models", m.get("name"), i) for i, m in enumerate(models)]
    if len(set(names)) < len(names):
        raise ValueError(f"suite.models: two models share a name ({names}); each names a leaderboard row")
    finetunes(cfg, names)
    benchmarks = []
    with _hydra_compose():
        for index, entry in enumerate(entries):
            name = _check_name("benchmarks", entry.get("name") or entry.get("benchmark"), index)
            if name in [b.name for b in benchmarks]:
                raise ValueError(f"suite.benchmarks: {name!r} twice; give one of them a `name`")
            found = SuiteBenchmark(name)
            protocols = list(entry.get("protocols") or [])
            if not protocols:
                node = cell_config(cfg, entry, "zeroshot")  # a config error fails here, not below
                try:
                    protocols = natural_protocols(cfg, node)
                except Exception as err:  # its data: recorded, the other benchmarks still run
                    found.error = (
                        f"cannot read it to choose its protocols (list them under protocols:): {err}"
                    )
            for protocol in protocols:
                _check_name("protocols", protocol, index)
                found.cells[protocol] = cell_config(cfg, entry, protocol)
            benchmarks.append(found)
    return models, benchmarks


def finetunes(cfg: DictConfig, models: Sequence[str] = ()) -> list[tuple[str, str]]:
    """suite.finetunes as (name, run): each names its rows, so no two entries (nor a model) share
    a name, and gives the finetune.py run folder whose results they show."""
    entries = list(cfg.suite.get("finetunes") or [])
    out = []
    for index, entry in enumerate(entries):
        name = _check_name("finetunes", entry.get("name"), index)
        if name in models or name in [n for n, _ in out]:
            raise ValueError(
                f"suite.finetunes[{index}].name={name!r} is taken (by a model or another run); each "
                "names the rows of one run"
            )
        run = entry.get("run")
        if not isinstance(run, str) or not run:
            raise ValueError(
                f"suite.finetunes[{index}] ({name}) needs `run`: the folder finetune.py wrote "
                f"(logs/finetune/runs/<date>/); got {run!r}"
            )
        out.append((name, run))
    return out


def finetune_cells(cfg: DictConfig) -> tuple[list[CellResult], dict[str, str]]:
    """The fine-tune runs' rows, as cells, and the metrics.json each was read from."""
    from flip.evaluation.finetune_runs import finetune_rows

    cells, sources = [], {}
    for name, run_folder in finetunes(cfg):
        for row in finetune_rows(name, run_folder):
            if row.cell.error is not None:
                log.error("%s: %s", row.cell.model, row.cell.error)
            else:
                sources[row.cell.model] = str(row.source)
            cells.append(row.cell)
    return cells, sources


def cell_record(model: DictConfig, node: DictConfig) -> DictConfig:
    """What a cell's results depend on: its model entry and its evaluation config."""
    return OmegaConf.create({"model": OmegaConf.to_container(model), "eval": OmegaConf.to_container(node)})


def is_done(folder: Path, model: DictConfig, node: DictConfig) -> bool:
    """The cell is complete and was computed with this config (batch settings aside): a suite
    edited between runs recomputes the cells it changed."""
    if not (folder / "metrics.json").is_file() or not (folder / CELL_CONFIG).is_file():
        return False
    saved, now = (
        OmegaConf.to_container(OmegaConf.load(folder / CELL_CONFIG)),
        OmegaConf.to_container(cell_record(model, node)),
    )
    for record in (saved, now):
        for key in IRRELEVANT:
            record["eval"].pop(key, None)
    if saved != now:
        log.info("%s: its config changed since it was computed; computing it again", folder)
    return saved == now


def _model_config(cfg: DictConfig, model: DictConfig) -> DictConfig:
    return OmegaConf.create(
        {
            "ckpt": model.get("ckpt"),
            "baseline": dict(model.get("baseline") or {}),
            "device": cfg.get("device"),
        }
    )


def _pretrained_tag(model: DictConfig) -> str:
    """The `pretrained` field of a CLIP_benchmark file: the weights' file name or the tag."""
    baseline = model.get("baseline") or {}
    name = str(baseline.get("name") or "")
    local = name.split(":", 1)[1] if name.startswith(("local-dir:", "hf-hub:")) else None
    where = (
        model.get("ckpt")
        or baseline.get("path")
        or baseline.get("pretrained")
        or local
        or baseline.get("format")
    )
    return Path(str(where)).stem if where else "unknown"


def write_clip_benchmark_folder(
    out: Path, results: Sequence[CellResult], models: Sequence[DictConfig]
) -> Path:
    """`out/clip_benchmark/`: every finished cell that CLIP_benchmark can express, as the file its
    `eval` would have written, rebuilt from the cells' metrics.json on every run (so it always
    matches the leaderboard). One flat folder of nothing but those files is what
    `clip_benchmark build DIR` reads; a cell folder also holds metrics.json, which it stops on."""
    from flip.evaluation.clip_benchmark import clip_benchmark_records, write_clip_benchmark_records

    folder = out / "clip_benchmark"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    by_name = {model.name: model for model in models}
    for cell in results:
        if cell.metrics is None:
            continue
        model = by_name[cell.model]
        dataset = cell.metrics.get("benchmark", cell.benchmark)  # the benchmark's own name, not the column
        records = clip_benchmark_records(cell.metrics, dataset, model.name, _pretrained_tag(model))
        write_clip_benchmark_records(records, folder)
    return folder


def run_cell(
    cfg: DictConfig, loaded: tuple, model: DictConfig, benchmark: str, protocol: str, node: DictConfig, cache
) -> CellResult:
    """One cell, computed in a hidden folder and renamed into place when whole."""
    from flip.evaluation.run import evaluate_config

    final = Path(cfg.output_dir) / "cells" / model.name / benchmark / protocol
    partial = final.parent / f".{protocol}{PARTIAL}"
    shutil.rmtree(partial, ignore_errors=True)
    started = time.time()
    net, model_id, label = loaded
    try:
        metrics = evaluate_config(net, node, partial, checkpoint=label, model_id=model_id, cache=cache)[
            protocol
        ]
        OmegaConf.save(cell_record(model, node), partial / CELL_CONFIG)
    except Exception as err:
        log.error("%s / %s / %s failed: %s", model.name, benchmark, protocol, err)
        shutil.rmtree(partial, ignore_errors=True)
        message = f"{type(err).__name__}: {err}"
        shutil.rmtree(final, ignore_errors=True)
        write_json_atomic(final / "error.json", {"error": message, "traceback": traceback.format_exc()})
        return CellResult(model.name, benchmark, protocol, error=message)
    shutil.rmtree(final, ignore_errors=True)  # an earlier failure's error.json
    partial.rename(final)
    log.info("%s / %s / %s done in %.0f s", model.name, benchmark, protocol, time.time() - started)
    return CellResult(model.name, benchmark, protocol, metrics=metrics)


def _release_memory() -> None:
    """Give back what a model held once nothing refers to it, before the next one loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(cfg: DictConfig) -> Leaderboard:
    """Every cell of the suite not done yet, then the leaderboard of all of them and of the
    fine-tune runs' rows (also written to output_dir as leaderboard.md, .csv and .png)."""
    from flip.cli.evaluate import load_eval_model
    from flip.evaluation.features import FeatureCache

    models, benchmarks = plan(cfg)
    out = Path(cfg.output_dir)
    cache = FeatureCache(cfg.feature_cache_dir or out / "feature_cache")
    results: list[CellResult] = []
    for model in models:
        loaded = None
        for benchmark in benchmarks:
            if benchmark.error is not None:
                results.append(CellResult(model.name, benchmark.name, "protocols", error=benchmark.error))
            for protocol, node in benchmark.cells.items():
                folder = out / "cells" / model.name / benchmark.name / protocol
                if is_done(folder, model, node):
                    log.info("%s / %s / %s: done, skipped", model.name, benchmark.name, protocol)
                    results.append(read_cell(folder, model.name, benchmark.name, protocol))
                    continue
                if loaded is None:
                    try:
                        loaded = load_eval_model(_model_config(cfg, model))
                    except Exception as err:  # its cells fail, the other models still run
                        loaded = f"the model did not load: {type(err).__name__}: {err}"
                        log.error("%s: %s", model.name, loaded)
                if isinstance(loaded, str):
                    results.append(CellResult(model.name, benchmark.name, protocol, error=loaded))
                    continue
                results.append(run_cell(cfg, loaded, model, benchmark.name, protocol, node, cache))
        loaded = None
        _release_memory()
    tuned, sources = finetune_cells(cfg)
    rows = [m.name for m in models] + list(dict.fromkeys(c.model for c in tuned))
    board = Leaderboard.from_cells(results + tuned, rows, sources)
    for path in board.write(out):
        log.info("wrote %s", path)
    if cfg.get("clip_benchmark_json"):  # the models' cells: a fine-tune is nothing CLIP_benchmark has
        log.info("wrote %s", write_clip_benchmark_folder(out, results, models))
    return board


def compare(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="eval/suite.py --compare", description="Where two leaderboard.csv files differ, cell by cell."
    )
    parser.add_argument("--compare", nargs=2, metavar=("A.csv", "B.csv"), required=True)
    args = parser.parse_args(argv)
    a, b = args.compare
    try:
        tables = read_leaderboard_csv(a), read_leaderboard_csv(b)
    except (OSError, ValueError) as err:
        print(f"eval/suite.py --compare: {err}", file=sys.stderr)
        return 2
    print(
        comparison_markdown(compare_leaderboards(*tables), a, b),
        end="",
    )
    return 0


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval_suite")
def _suite(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """eval/suite.py: `--compare A.csv B.csv`, or a Hydra run of conf/eval_suite.yaml."""
    if "--compare" in sys.argv[1:]:
        sys.exit(compare(sys.argv[1:]))
    _suite()
