"""Every command the docs show is one a test or a bench runs, and it is written as it runs.

The commands are read from README.md, docs/, bench/README.md and the Dockerfile's header, not
copied here, so a doc edit is tested as it stands.

- Training launches (`python train.py`, srun, torchrun, docker run) are composed (never
  trained): the config must resolve, pass train.py's start-up checks, and a command that trains
  on real data or launches at scale must name its recipe and get that recipe's settings, not
  the demo's (the default experiment).
- Every other FLIP command (flip-data, flip-query, flip-export, flip-zero-to-fp32, eval/*.py,
  finetune.py, bench/*.py, python -m flip..., make) is parsed by its own entry point's argument
  parser or Hydra config, exactly as typed, and must be one that a test runs (RUN_BY names the test, and
  the test is checked to call that entry point) or a bench script. A shell line that is neither
  FLIP's nor a known outside tool fails, so a new command cannot go into the docs untested.
- Python snippets parse and use only names the `flip` package has; a YAML excerpt headed by a
  config path holds exactly what that file holds.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import itertools
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

import flip.config  # noqa: F401 (registers ${cpu_precision:})
from flip.config import register_resolvers
from flip.training.finetune.run import check_settings
from flip.training.run import validate

from .helpers import CONF, ROOT, compose_finetune_config, compose_train_config

START = re.compile(r"(?:srun\s+(?:\S+\s+)*?)?python3?\s+train\.py\b|torchrun\s|docker\s+run\s")
SHELL_VARIABLE = re.compile(r"\$(?:\{([A-Z_][A-Z0-9_]*)\}|([A-Z_][A-Z0-9_]*))")
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd"}
HYDRA_FLAGS = {"--resolve", "--help", "-h", "--hydra-help", "--info", "-i"}
# settings a recipe decides; a documented run on real data must not inherit the demo's
RECIPE_KEYS = (
    "loss",
    "data._target_",
    "data.batch_size",
    "optim.lr",
    "optim.lr_image",
    "optim.warmup_steps",
    "optim.weight_decay",
    "trainer.max_steps",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "evaluate",
)
DOCKER_IMAGE = "flip"  # README: docker build -f docker/Dockerfile -t flip .


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    launcher: str  # python, srun, torchrun, docker
    text: str

    def __str__(self) -> str:
        return self.where


INLINE = "inline"  # the kind of a `code span` in prose; fenced lines carry their block's language
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "bench" / "README.md"]


def _code_lines(path: Path) -> list[tuple[int, str, str]]:
    """(line number, text, kind) of the places a command can be written: code blocks
    (continuations joined; kind = the block's language, "" for none), inline code in prose
    (kind INLINE), and the Dockerfile's comment header (kind "sh")."""
    lines = path.read_text().splitlines()
    out, fenced, language, pending, first = [], False, "", "", 0
    for number, line in enumerate(lines, 1):
        if path.suffix != ".md":  # a comment header: indented lines are code, the rest prose
            if not line.startswith("#"):
                continue
            line = line[1:]
            fenced, language = line.startswith("   ") or bool(pending), "sh"
        elif line.lstrip().startswith("```"):
            fenced = not fenced
            language = line.strip()[3:].strip() if fenced else ""
            continue
        if not fenced:
            out += [(number, span, INLINE) for span in re.findall(r"`([^`]+)`", line)]
            continue
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line, language))
        pending = ""
    return out


def _logical_lines(path: Path) -> list[tuple[int, str]]:
    return [(number, text) for number, text, _ in _code_lines(path)]


def documented_commands() -> list[Command]:
    files = [*DOCS, ROOT / "docker" / "Dockerfile"]
    commands = []
    for path in files:
        for number, line in _logical_lines(path):
            match = START.search(line)
            if match:
                launcher = match.group(0).split()[0].replace("python3", "python")
                where = f"{path.relative_to(ROOT)}:{number}"
                commands.append(Command(where, launcher, line[match.start() :].strip()))
    return commands


COMMANDS = documented_commands()


def _expand(token: str, env: dict[str, str], where: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in env, f"{where} uses ${name}: give it a sample value in this test"
        return env[name]

    return SHELL_VARIABLE.sub(value, token)


def hydra_arguments(command: Command, env: dict[str, str]) -> tuple[list[str], bool]:
    """The Hydra overrides a command passes to train.py, shell variables filled in; and -m."""
    tokens = shlex.split(command.text, comments=True)
    if command.launcher == "docker":
        assert DOCKER_IMAGE in tokens, f"{command}: no image {DOCKER_IMAGE!r} in {command.text!r}"
        args = tokens[tokens.index(DOCKER_IMAGE) + 1 :]
    else:
        args = tokens[tokens.index("train.py") + 1 :]
    overrides, multirun, skip = [], False, False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif arg not in HYDRA_FLAGS:
            overrides.append(_expand(arg, env, command.where))
    return overrides, multirun


def sweep(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every job of a multirun (comma-separated values outside brackets), else the one run."""
    if not multirun:
        return [overrides]
    options = []
    for override in overrides:
        key, _, value = override.partition("=")
        plain = value and not any(c in value for c in "[]{}()'\"")
        options.append([f"{key}={v}" for v in value.split(",")] if plain else [override])
    return [list(job) for job in itertools.product(*options)]


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {
        "NODE_RANK": "0",
        "MASTER_ADDR": "node0",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_JOB_NAME": "flip-vitb16-bert",
        "SLURM_JOB_ID": "1234",
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_CPUS_PER_TASK": "32",
        "RUN": str(tmp_path / "run"),
        "CKPT": "null",
        "PWD": str(tmp_path),
        "HOME": str(tmp_path),
        "USER": "flip",
        "FLIP_ROOT": str(tmp_path),
    }


def _choice(cfg, group: str) -> str | None:
    return cfg.hydra.runtime.choices.get(group)


def _overrides_key(overrides: list[str], key: str) -> bool:
    group = key.split(".")[0]
    names = [o.lstrip("+~").partition("=")[0] for o in overrides]
    return any(n in (key, group) or n.startswith(f"{key}.") or key.startswith(f"{n}.") for n in names)


def _select(cfg, key: str):
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def compose(tmp_path: Path, overrides: list[str]):
    cfg = compose_train_config(tmp_path, overrides, base=[])
    register_resolvers()
    with open_dict(cfg):
        ckpt = cfg.get("ckpt_path")
        if ckpt is not None:  # a documented placeholder (.../last.ckpt): stands for a file that exists
            (tmp_path / "last.ckpt").write_bytes(b"")
            cfg.ckpt_path = str(tmp_path / "last.ckpt")
    return cfg


def test_the_docs_show_every_kind_of_launch():
    launchers = {c.launcher for c in COMMANDS}
    assert {"python", "srun", "torchrun", "docker"} <= launchers, [str(c) for c in COMMANDS]


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_a_documented_command_composes_into_the_recipe_it_runs(command, tmp_path, env):
    overrides, multirun = hydra_arguments(command, env)
    for job in sweep(overrides, multirun):
        cfg = compose(tmp_path, job)
        plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.to_container(plain, resolve=True, throw_on_missing=True)  # every value given
        validate(cfg)  # train.py's start-up checks (evaluation data, checkpoint, optimizer)

        recipe = _choice(cfg, "experiment")
        real_data = str(cfg.data._target_).endswith("ShardDataModule")
        if command.launcher != "python" or real_data:
            assert recipe not in (None, "demo"), (
                f"{command} ({command.text!r}) trains on shards or launches at scale but runs the "
                f"demo recipe: name a recipe with experiment=... (conf/experiment/)"
            )
            alone = compose(tmp_path, [f"experiment={recipe}", "data.train_shards=/data/shards"])
            demo = compose(tmp_path, [])
            differs = [key for key in RECIPE_KEYS if _select(alone, key) != _select(demo, key)]
            assert {"loss", "data._target_", "optim.warmup_steps", "trainer.max_steps"} <= set(differs)
            for key in RECIPE_KEYS:
                if not _overrides_key(job, key):
                    assert _select(cfg, key) == _select(alone, key), f"{command}: {key} is not the recipe's"
        else:  # or a demo variant (experiment=demo_<what>) or a recipe's tiny twin (<recipe>_tiny)
            assert recipe == "demo" or str(recipe).startswith("demo_") or str(recipe).endswith("_tiny"), (
                f"{command}: a demo variation runs on FaceShapes with the demo recipe"
            )

        text_cfg = OmegaConf.select(cfg, "model.arch.text_cfg") or {}
        for name, term in cfg.loss.terms.items():
            if text_cfg.get("hf_model_name") and str(term.loss._target_).endswith("FilipLoss"):
                assert term.loss.exclude_sot is False, (
                    f"{command}: loss term {name!r} drops the first text token, BERT's [CLS], which "
                    "reads the whole caption: set exclude_sot=false for a Hugging Face text tower"
                )


def test_make_train_is_exactly_the_demo(tmp_path):
    recipe = re.search(r"^train:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), flags=re.M)
    assert recipe is not None and recipe.group(1).split() == ["$(PY)", "train.py"]
    cfg = compose(tmp_path, [])
    assert _choice(cfg, "experiment") == "demo"
    demo = OmegaConf.load(ROOT / "conf" / "experiment" / "demo.yaml")
    for key in ("trainer.max_steps", "trainer.val_check_interval", "optim.lr", "optim.warmup_steps"):
        assert _select(cfg, key) == OmegaConf.select(demo, key)
    assert _choice(cfg, "data") == "faceshapes" and _choice(cfg, "loss") == "clip_statements" and cfg.evaluate
    # the statements the demo's loss chooses among come with it
    assert cfg.data.hard_negatives.form == "statement"


def test_each_docker_cuda_variant_installs_with_constraints_of_its_own_cuda(tmp_path):
    constraints = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    cuda_pins = [line for line in constraints if re.match(r"(?i)(nvidia-|cuda-|triton==)", line)]
    assert any("cu13" in line for line in cuda_pins)  # what PyPI's torch brings
    script = ROOT / "docker" / "cuda_variant.sh"
    for cuda, index, kept in (
        ("13.0.1", "https://pypi.org/simple", constraints),
        ("12.8.1", "https://download.pytorch.org/whl/cu128", [c for c in constraints if c not in cuda_pins]),
    ):
        out = tmp_path / f"constraints-{cuda}.txt"
        done = subprocess.run(
            ["sh", str(script), cuda, str(ROOT / "requirements" / "constraints.txt"), str(out)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stdout.strip() == index
        assert out.read_text().splitlines() == kept
    refused = subprocess.run(["sh", str(script), "11.8.0", "in", "out"], capture_output=True, text=True)
    assert refused.returncode != 0 and "13.0.x" in refused.stderr and "12.8.x" in refused.stderr
    # the Dockerfile installs everything under the variant's constraints, from the variant's index
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.findall(r"-c (\S+\.txt)", dockerfile) == ["/opt/constraints.txt", "/opt/constraints.txt"]
    assert 'sh docker/cuda_variant.sh "${CUDA}"' in dockerfile and "FROM nvidia/cuda:${CUDA}-" in dockerfile


# --- every other command: parsed by its own entry point, and run by a test -----------------

SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "python3", ".venv/bin/python"}
SUBCOMMANDS = {"flip-data"}  # programs whose first argument picks a tool: `flip-data celeba` names one
TRAIN_LAUNCH = re.compile(r"^(?:srun|torchrun|docker\s+run)\b|^(?:\S*/)?python3?\s+train\.py\b")
# Tools of other projects the docs show beside FLIP's own commands; what FLIP relies on in each
# is tested on FLIP's side (named here), the tools themselves are not run.
OUTSIDE_TOOLS = {
    "pip": "installs; .ci/run installs through `make setup`, the Dockerfile through pip itself",
    "img2dataset": "its webdataset layout is what test_prepare_facecaption.py and the shard tests read",
    "clip_benchmark": "test_clip_benchmark_interop.py runs the package as docs/evaluation.md's lines say",
    "docker": "`docker build`; `docker run` is a training launch, composed above",
    "sbatch": "submits the script whose srun line is composed above",
    ".": "shell: activates a virtual environment",
    "python -m venv": "creates a virtual environment",
}
# The test that runs each documented entry point: (test file, module, function it must call).
RUN_BY = {
    "flip-data folder": ("tests/test_prepare_folder.py", "flip.cli.data", "main"),
    "flip-data facecaption15m": ("tests/test_prepare_facecaption.py", "flip.cli.data", "main"),
    "flip-data celeba": ("tests/test_prepare_celeba.py", "flip.cli.data", "main"),
    "flip-data merge-report": ("tests/test_prepare_parts.py", "flip.cli.data", "main"),
    "flip-data curate": ("tests/test_curate.py", "flip.cli.data", "main"),
    "flip-query": ("tests/test_query.py", "flip.cli.query", "main"),
    "flip-export": ("tests/test_export.py", "flip.cli.export", "main"),
    "flip-convert": ("tests/test_baselines.py", "flip.cli.convert", "main"),
    "flip-zero-to-fp32": ("tests/test_checkpoint_safety.py", "flip.training.deepspeed", "main"),
    # the four scripts run flip.cli.evaluate.run on conf/eval_<name>.yaml; test_eval_entrypoints.py
    # calls it through tests/helpers/evaluation.py
    "eval/zeroshot.py": ("tests/helpers/evaluation.py", "flip.cli.evaluate", "run"),
    "eval/linear_probe.py": ("tests/helpers/evaluation.py", "flip.cli.evaluate", "run"),
    "eval/retrieval.py": ("tests/helpers/evaluation.py", "flip.cli.evaluate", "run"),
    "eval/verification.py": ("tests/helpers/evaluation.py", "flip.cli.evaluate", "run"),
    "eval/suite.py": ("tests/test_suite.py", "flip.cli.suite", "run"),
    "eval/token_probe.py": ("tests/helpers/evaluation.py", "flip.cli.evaluate", "run"),
    "eval/parsing_probe.py": ("tests/helpers/evaluation.py", "flip.cli.evaluate", "run"),
    "eval/landmark_probe.py": ("tests/helpers/evaluation.py", "flip.cli.evaluate", "run"),
    "finetune.py": ("tests/test_finetune_run.py", "flip.training.finetune.run", "finetune"),
    "python -m flip.data.faceshapes.generate": (
        "tests/test_faceshapes.py",
        "flip.data.faceshapes.generate",
        "main",
    ),
}


@dataclass(frozen=True)
class ShellCommand:
    where: str
    kind: str  # the block's language, or INLINE
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return self.where


def console_scripts() -> dict[str, str]:
    """name -> "module:function" from pyproject.toml's [project.scripts]."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n((?:[^\[].*\n?)*)", text, flags=re.M)
    assert section, "pyproject.toml has no [project.scripts]"
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section.group(1), flags=re.M))


SCRIPTS = console_scripts()


def _simple_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line: split at && || ; |, leading VAR=value dropped."""
    tokens = shlex.split(text, comments=True)
    out, current = [], []
    for token in [*tokens, ";"]:
        if token in ("&&", "||", ";", "|"):
            while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                current = current[1:]
            if current and current[0] != "export":
                out.append(current)
            current = []
        else:
            current.append(token)
    return out


def _is_flip_program(argv: list[str]) -> bool:
    if argv[0] in SCRIPTS or argv[0] == "make":
        return True
    return (
        argv[0] in PYTHON
        and len(argv) > 1
        and re.match(r"^(eval|bench)/|^-m$|^finetune\.py$", argv[1]) is not None
    )


def shell_commands() -> list[ShellCommand]:
    """Every command line of a shell block, and every inline span in prose that runs a FLIP
    program with arguments. A span that only names a tool (`flip-query`, `flip-data celeba`)
    or sits in a heading is a name, not a command."""
    commands = []
    for path in DOCS:
        headings = {n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith("#")}
        for number, text, kind in _code_lines(path):
            if kind not in SHELL and (kind != INLINE or number in headings):
                continue
            where = f"{path.relative_to(ROOT)}:{number}"
            for argv in _simple_commands(text):
                name_only = len(argv) < (3 if argv[0] in SUBCOMMANDS else 2)
                if kind == INLINE and (name_only or not _is_flip_program(argv)):
                    continue
                commands.append(ShellCommand(where, kind, tuple(argv)))
    return commands


SHELL_COMMANDS = shell_commands()


class _Parsed(BaseException):
    """Raised by the patched ArgumentParser.parse_args: the arguments parsed, nothing else ran."""


def _parse_with(entry: Callable[[], object], argv: list[str], monkeypatch, capsys, command) -> None:
    """Run an argparse entry point up to its parse_args, with argv as sys.argv."""
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", argv)
    try:
        entry()
    except _Parsed:
        return
    except SystemExit as exc:  # argparse: --help exits 0, a wrong argument exits 2 with a message
        assert exc.code in (0, None), f"{command}: {' '.join(argv)!r} is refused: {capsys.readouterr().err}"
        return
    raise AssertionError(f"{command}: {' '.join(argv)!r} never parsed its arguments")


def _entry(spec: str) -> Callable[[], object]:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def _runs(test_file: str, module: str, function: str, *strings: str) -> bool:
    """Does the test file call module.function (imported by name, or through the module)?"""
    path = ROOT / test_file
    if not path.is_file():
        return False
    tree = ast.parse(path.read_text())
    module_names, calls_by_name = set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if node.module == module and alias.name == function:
                    calls_by_name = True
                if f"{node.module}.{alias.name}" == module:
                    module_names.add(alias.asname or alias.name)
    through_module = any(
        isinstance(n, ast.Attribute)
        and n.attr == function
        and isinstance(n.value, ast.Name)
        and n.value.id in module_names
        for n in ast.walk(tree)
    )
    constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return (calls_by_name or through_module) and set(strings) <= constants


def _assert_run_by_a_test(key: str, command, *strings: str) -> None:
    assert key in RUN_BY, f"{command}: {key!r} is documented but no test is named for it in RUN_BY"
    test_file, module, function = RUN_BY[key]
    assert _runs(test_file, module, function, *strings), (
        f"{command}: {test_file} does not call {module}.{function}"
        + (f" with {strings}" if strings else "")
        + f", so nothing runs {key!r} as documented"
    )


def _compose_eval(config_name: str, overrides: list[str], command) -> None:
    assert (CONF / f"{config_name}.yaml").is_file(), f"{command}: no conf/{config_name}.yaml"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_compose(config_name=config_name, overrides=overrides)  # unknown keys and options fail


def test_the_docs_show_every_kind_of_flip_command():
    programs = {c.argv[0] for c in SHELL_COMMANDS} | {c.argv[1] for c in SHELL_COMMANDS if len(c.argv) > 1}
    assert {
        "flip-data",
        "flip-query",
        "flip-export",
        "make",
        "eval/zeroshot.py",
        "bench/probe_speed.py",
        "finetune.py",
    } <= programs


def _compose_finetune(overrides: list[str], tmp_path: Path, command) -> None:
    """finetune.py's config as the command composes it: every value given, its start-up checks passed."""
    cfg = compose_finetune_config(tmp_path, overrides, base=[])
    register_resolvers()
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(plain, resolve=True, throw_on_missing=True)  # e.g. a benchmark's root
    check_settings(cfg)


@pytest.mark.parametrize("command", SHELL_COMMANDS, ids=str)
def test_a_documented_command_is_one_a_test_or_bench_runs(command, env, monkeypatch, capsys, tmp_path):
    argv = [_expand(token, env, command.where) for token in command.argv]
    text = " ".join(argv)
    program = argv[0]
    if TRAIN_LAUNCH.search(" ".join(command.argv)):
        launches = {(c.where, c.text.split()[0]) for c in COMMANDS}
        assert any(where == command.where for where, _ in launches), f"{command}: {text!r} is not composed"
        return
    if program in PYTHON and argv[1:3] == ["-m", "venv"]:
        return  # OUTSIDE_TOOLS["python -m venv"]
    if program in SCRIPTS:
        key = program if program != "flip-data" else f"{program} {argv[1] if len(argv) > 1 else ''}".strip()
        strings = (argv[1],) if program == "flip-data" else ()
        _assert_run_by_a_test(key, command, *strings)
        _parse_with(_entry(SCRIPTS[program]), argv, monkeypatch, capsys, command)
    elif program in PYTHON and argv[1].startswith("eval/"):
        script = argv[1]
        assert (ROOT / script).is_file(), f"{command}: {script} does not exist"
        _assert_run_by_a_test(script, command)
        if argv[2:3] == ["--compare"]:  # eval/suite.py's one mode outside Hydra
            _parse_with(
                importlib.import_module("flip.cli.suite").main, argv[1:], monkeypatch, capsys, command
            )
        else:
            _compose_eval(f"eval_{Path(script).stem}", argv[2:], command)
    elif program in PYTHON and argv[1] == "finetune.py":
        _assert_run_by_a_test("finetune.py", command)
        _compose_finetune(argv[2:], tmp_path, command)
    elif program in PYTHON and argv[1].startswith("bench/"):
        script = ROOT / argv[1]
        assert script.is_file(), f"{command}: {argv[1]} does not exist"
        main = runpy.run_path(str(script), run_name="documented_command")["main"]  # a bench runs it
        _parse_with(main, [argv[1], *argv[2:]], monkeypatch, capsys, command)
    elif program in PYTHON and argv[1] == "-m" and argv[2].startswith("flip."):
        _assert_run_by_a_test(f"python -m {argv[2]}", command)
        _parse_with(importlib.import_module(argv[2]).main, [argv[2], *argv[3:]], monkeypatch, capsys, command)
    elif program == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in argv[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), (
                f"{command}: no make target {target}"
            )
    else:
        assert program in OUTSIDE_TOOLS, (
            f"{command}: {text!r} is neither a FLIP command a test runs nor a known outside tool "
            f"({', '.join(sorted(OUTSIDE_TOOLS))})"
        )


def _python_blocks() -> list[tuple[str, str]]:
    blocks = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        inside, start, body = False, 0, []
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                if inside:
                    blocks.append((f"{path.relative_to(ROOT)}:{start}", "\n".join(body)))
                    inside = False
                elif line.strip() == "```python":
                    inside, start, body = True, number + 1, []
                continue
            if inside:
                body.append(line)
    return blocks


@pytest.mark.parametrize(("where", "source"), _python_blocks(), ids=[w for w, _ in _python_blocks()])
def test_a_documented_python_snippet_uses_what_flip_has(where, source):
    import flip

    tree = ast.parse(source, filename=where)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "flip":
            assert hasattr(flip, node.attr), f"{where}: flip.{node.attr} does not exist"


def _subset(excerpt, whole, where: str, key: str = "") -> None:
    if isinstance(excerpt, dict):
        assert isinstance(whole, dict), f"{where}: {key} is not a mapping in the file"
        for name, value in excerpt.items():
            assert name in whole, f"{where}: {key}{name} is not in the file"
            _subset(value, whole[name], where, f"{key}{name}.")
    else:
        assert excerpt == whole, (
            f"{where}: {key.rstrip('.')} is {whole!r} in the file, {excerpt!r} in the docs"
        )


def test_a_documented_config_excerpt_says_what_its_file_says():
    excerpts = 0
    for path in DOCS:
        for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S):
            named = re.match(r"#\s*(conf/\S+\.yaml)", block)
            if named:
                excerpts += 1
                where = f"{path.relative_to(ROOT)} ({named.group(1)})"
                _subset(yaml.safe_load(block), yaml.safe_load((ROOT / named.group(1)).read_text()), where)
    assert excerpts, "no YAML excerpt headed by its conf/ path was found"
