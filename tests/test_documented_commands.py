"""Every training command the docs show composes, as written, into the recipe it claims to run.

The commands are read from README.md, docs/ and the Dockerfile's header, not copied here, so a
doc edit is tested as it stands. Each is composed (never trained): the config must resolve,
pass train.py's start-up checks, and a command that trains on real data or launches at scale
must name its recipe and get that recipe's settings, not the demo's (the default experiment).
"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

import flip.config  # noqa: F401 (registers ${cpu_precision:})
from flip.config import register_resolvers
from flip.training.run import validate

from .helpers import ROOT, compose_train_config

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


def _logical_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the places a command can be written: code blocks (continuations
    joined), inline code in prose, and the Dockerfile's comment header."""
    lines = path.read_text().splitlines()
    out, fenced, pending, first = [], False, "", 0
    for number, line in enumerate(lines, 1):
        if path.suffix != ".md":  # a comment header: indented lines are code, the rest prose
            if not line.startswith("#"):
                continue
            line = line[1:]
            fenced = line.startswith("   ") or bool(pending)
        elif line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
            continue
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    return out


def documented_commands() -> list[Command]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "docker" / "Dockerfile"]
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
        else:
            assert recipe == "demo", f"{command}: a demo variation runs on FaceShapes with the demo recipe"

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
    assert _choice(cfg, "data") == "faceshapes" and _choice(cfg, "loss") == "clip_filip" and cfg.evaluate


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
