"""Plain helpers shared by the test modules (fixtures stay in tests/conftest.py): the tiny model's
configs, small images and shards, checkpoints, short fits, and commands run in a subprocess.

Tests import them from here: `from .helpers import TINY_ARCH, run_train_py`; the BERT helpers from
`.helpers.bert`, so that only the tests that use them pay for importing `transformers`' models.
"""

from .checkpoints import save_checkpoint
from .configs import (
    FINETUNE_BASE,
    MODEL,
    OPTIM,
    SHARDS_BASE,
    TINY_ARCH,
    TINY_OVERRIDES,
    compose_eval,
    compose_finetune_config,
    compose_train_config,
    eval_overrides,
    loss_file,
)
from .evaluation import run_linear_probe, run_retrieval, run_verification, run_zeroshot
from .images import COLOURS, jpeg_bytes, write_image, write_square
from .paths import CONF, ROOT
from .processes import (
    LAUNCHER_VARIABLES,
    flip_data_command,
    flip_data_env,
    flip_root_env,
    free_port,
    run_train_py,
)
from .runs import TrainedRun
from .shards import read_shards, write_caption_shards, write_img2dataset
from .training import NaNLoss, Poisoned, count_filip_blocks, csv_losses, fit_briefly, random_batch

__all__ = [
    "COLOURS",
    "CONF",
    "FINETUNE_BASE",
    "LAUNCHER_VARIABLES",
    "MODEL",
    "OPTIM",
    "ROOT",
    "SHARDS_BASE",
    "TINY_ARCH",
    "TINY_OVERRIDES",
    "NaNLoss",
    "Poisoned",
    "TrainedRun",
    "compose_eval",
    "compose_finetune_config",
    "compose_train_config",
    "count_filip_blocks",
    "csv_losses",
    "eval_overrides",
    "fit_briefly",
    "flip_data_command",
    "flip_data_env",
    "flip_root_env",
    "free_port",
    "jpeg_bytes",
    "loss_file",
    "random_batch",
    "read_shards",
    "run_linear_probe",
    "run_retrieval",
    "run_train_py",
    "run_verification",
    "run_zeroshot",
    "save_checkpoint",
    "write_caption_shards",
    "write_image",
    "write_img2dataset",
    "write_square",
]
