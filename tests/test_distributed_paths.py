"""The multi-process training path, simulated on the CPU: a process group that refuses CPU tensors
as NCCL does (`cuda:gloo`), 2 gloo ranks under DDP, DeepSpeed ZeRO-2/3 on the CPU accelerator with
bf16 weights. Each test stands for a defect that would stop, hang or skew a real GPU run."""

from __future__ import annotations

import contextlib
import os
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from flip.benchmarks import read_folder
from flip.training.callbacks import ZeroShotBenchmark
from flip.training.deepspeed import _scalar_parameters_broadcast_apart
from flip.training.module import FlipLitModule

from .helpers import COLOURS, CONF, MODEL, OPTIM, Poisoned, count_filip_blocks, free_port, loss_file


def _loss(name: str) -> dict:
    return loss_file(name)[0]


# ---------------------------------------------------------------- engine start: where scalars are broadcast


def test_no_parameter_is_broadcast_from_the_cpu_under_a_cuda_only_process_group(monkeypatch):
    """NCCL has no CPU backend: a broadcast before the engine moved the model to its GPU fails with
    "No backend type associated with device type cpu". `cuda:gloo` refuses CPU tensors the same way."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    loss, model_settings = loss_file("siglip")
    module = FlipLitModule({**MODEL, **model_settings}, loss, OPTIM)  # logit_scale and logit_bias: 0-dim
    assert [p.dim() for p in (module.model.clip.logit_scale, module.model.clip.logit_bias)] == [0, 0]
    dist.init_process_group(backend="cuda:gloo", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.broadcast(torch.zeros(()), src=0)  # the group is as strict as NCCL
        with _scalar_parameters_broadcast_apart(module):
            pass  # what runs before and after deepspeed.initialize in DeepSpeedStrategy
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- 2 processes: DDP and DeepSpeed on gloo


def _patch_deepspeed_for_cpu() -> None:
    """DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce (a minute, a C++
    toolchain); it is optional and left out (see tests/test_strategies.py)."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


class _Recorder(L.Callback):
    """NaN on rank `bad_rank` at `nan_steps`; the whole weights at the start of every step."""

    def __init__(self, bad_rank: int, nan_steps: set[int]) -> None:
        self.bad_rank, self.nan_steps, self.weights, self.logged = bad_rank, nan_steps, {}, {}

    def on_train_start(self, trainer, module) -> None:
        module.criterion = Poisoned(
            module.criterion,
            lambda: trainer.global_rank == self.bad_rank and trainer.global_step in self.nan_steps,
        )

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        with _gathered(trainer.strategy, module.model):
            self.weights[trainer.global_step] = {
                k: v.detach().float().clone().reshape(v.shape) for k, v in module.model.named_parameters()
            }

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.logged[trainer.global_step - 1] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def _gathered(strategy, model):
    """The whole weights on every rank under ZeRO-3 (a collective), as they are otherwise."""
    if not getattr(strategy, "zero_stage_3", False):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _write_benchmark(root: Path) -> None:
    from PIL import Image

    for name, colour in COLOURS.items():
        (root / "test" / name).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (40, 40), tuple(min(255, c + 8 * i) for c in colour)).save(
                root / "test" / name / f"{i}.png"
            )


def _worker(rank: int, world: int, port: int, directory: str, scenario: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )  # fmt: skip
    for name in [n for n in os.environ if n.startswith(("SLURM_", "TORCHELASTIC_"))]:
        del os.environ[name]
    torch.manual_seed(0)
    loss, model_settings = loss_file("siglip" if scenario != "ddp" else "clip")
    module = FlipLitModule({**MODEL, **model_settings}, loss, OPTIM)
    if rank == 1:  # a rank that started from other scalars: the engine must make them rank 0's
        with torch.no_grad():
            for p in module.model.parameters():
                if p.dim() == 0:
                    p.add_(0.5)
    recorder = _Recorder(bad_rank=1, nan_steps={1})
    callbacks = [recorder]
    benchmark = None
    if scenario != "ddp":
        benchmark = ZeroShotBenchmark(
            {"name": "folder", "reader": partial(read_folder, Path(directory)), "test_split": "test"},
            every_n_steps=2, max_samples=None, batch_size=5,
        )  # fmt: skip
        callbacks.append(benchmark)
    if scenario == "ddp":
        strategy, precision = "ddp", "32-true"
    else:
        from hydra.utils import instantiate

        _patch_deepspeed_for_cpu()
        cfg = OmegaConf.load(CONF / "trainer" / f"deepspeed_{scenario}.yaml").strategy
        strategy, precision = instantiate(cfg), "bf16-mixed"
    tokens = module.model.tokenize([f"a {c} square" for c in ("red", "green", "blue", "hat")] * 6)
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, tokens), batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, precision=precision, max_steps=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, loader)
    result = {
        "weights": recorder.weights,
        "logged": recorder.logged,
        "skipped": module.nonfinite.skipped,
        "zeroshot": None if benchmark is None else benchmark.history,
        "micro_batch": getattr(trainer.strategy, "config", {}).get("train_micro_batch_size_per_gpu"),
    }
    torch.save(result, Path(directory) / f"rank{rank}.pt")


def _spawn(scenario: str, directory: Path, world: int = 2) -> list[dict]:
    _write_benchmark(directory)
    mp.spawn(_worker, args=(world, free_port(), str(directory), scenario), nprocs=world, join=True)
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_skipped_together(ranks: list[dict]) -> None:
    """Step 1 was NaN on rank 1 only: every rank skipped it, and every rank still agrees."""
    for result in ranks:
        assert result["skipped"] == 1
        weights = result["weights"]
        for key, value in weights[1].items():  # step 1 changed nothing
            torch.testing.assert_close(weights[2][key], value, rtol=0, atol=0, msg=key)
        assert any(not torch.equal(weights[1][k], weights[0][k]) for k in weights[0])  # step 0 trained
    for step in (0, 1, 2):
        for key, value in ranks[0]["weights"][step].items():
            torch.testing.assert_close(ranks[1]["weights"][step][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_ddp_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    ranks = _spawn("ddp", tmp_path)
    _assert_skipped_together(ranks)
    # the skipped step logs its own loss (NaN on rank 1, this step's on rank 0), never the previous one
    logged = ranks[0]["logged"]
    assert logged[1]["train/skipped_steps"] == 1 and "train/skipped_steps" not in logged[0]
    assert logged[1]["train/loss"] != logged[0]["train/loss"]
    assert ranks[1]["logged"][1]["train/loss"] != ranks[1]["logged"][1]["train/loss"]  # NaN


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_bf16_two_ranks_start_skip_together_and_evaluate_on_every_rank(tmp_path, stage):
    ranks = _spawn(stage, tmp_path)
    _assert_skipped_together(ranks)  # step 0's weights agree: rank 1's other scalars were replaced
    # the zero-shot benchmark ran at step 2 on bf16 weights, the same on both ranks
    assert [step for step, _ in ranks[0]["zeroshot"]] == [2]
    assert ranks[0]["zeroshot"] == ranks[1]["zeroshot"]
    assert 0.0 <= ranks[0]["zeroshot"][0][1]["accuracy"] <= 1.0


@pytest.mark.slow
def test_a_skipped_step_is_logged_as_skipped_with_its_own_loss_not_the_last_finite_one(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(5)
    module = FlipLitModule(MODEL, _loss("clip"), OPTIM)
    tokens = module.model.tokenize(["a red square", "a blue square", "a hat"] * 6)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(18, 3, 32, 32), tokens), batch_size=6
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        callbacks=[_Recorder(bad_rank=0, nan_steps={1})],
    )  # fmt: skip
    trainer.fit(module, loader)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f) if r.get("train/loss")}
    assert sorted(rows) == [0, 1, 2]
    assert rows[1]["train/loss"] != rows[0]["train/loss"]  # not step 0's loss again: this step's NaN
    assert rows[1]["train/loss"].lower() == "nan" and float(rows[2]["train/loss"]) > 0
    assert [rows[s]["train/skipped_steps"] for s in (0, 1, 2)] == ["", "1.0", "1.0"]


# ---------------------------------------------------------------- configurations refused before any work


@pytest.mark.parametrize(
    "trainer",
    ["deepspeed_zero3", pytest.param("deepspeed_zero3_offload", marks=pytest.mark.slow)],  # builds CPU Adam
)
def test_compile_under_zero3_is_refused_at_validation_with_what_works(train_config, trainer):
    from flip.training.run import validate

    cfg = train_config(f"trainer={trainer}", "compile=true")
    with pytest.raises(ValueError, match=r"compile=True does not work with DeepSpeed ZeRO-3.*compile=false"):
        validate(cfg)
    validate(train_config(f"trainer={trainer}", "compile=false"))
    validate(train_config("trainer=deepspeed_zero2", "compile=true"))  # ZeRO-2 keeps whole weights
    validate(train_config("trainer=ddp", "compile={backend: eager}"))


def test_deepspeed_is_told_the_real_micro_batch_size(train_config, tmp_path):
    """FLIP's loaders batch inside the pipeline (no batch sampler): DeepSpeed must still get
    data.batch_size as train_micro_batch_size_per_gpu, not 1."""
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from flip.data.datamodule import ShardDataModule
    from flip.data.pipeline import make_loader

    strategy = instantiate(train_config("trainer=deepspeed_zero2").trainer.strategy)
    datamodule = ShardDataModule(train_shards=str(tmp_path), batch_size=24)

    class Batches(torch.utils.data.IterableDataset):  # batched already, as the shard pipeline is
        def __iter__(self):
            yield torch.zeros(24, 3, 32, 32)

    loader = make_loader(Batches(), num_workers=0)
    source = SimpleNamespace(is_defined=lambda: True, dataloader=lambda: loader)
    trainer = SimpleNamespace(
        datamodule=datamodule, accumulate_grad_batches=2, gradient_clip_val=None,
        fit_loop=SimpleNamespace(_data_source=source),
    )  # fmt: skip
    strategy._lightning_module = SimpleNamespace(trainer=trainer)
    strategy._format_batch_size_and_grad_accum_config()
    assert strategy.config["train_micro_batch_size_per_gpu"] == 24
    assert strategy.config["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({}, "train.log"),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, "train.log"),
        ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, "train.rank1.log"),  # Lightning's child
        ({"RANK": "5", "LOCAL_RANK": "1"}, "train.rank5.log"),  # torchrun
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}, "train.rank3.log"),  # srun
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "LOCAL_RANK": "2"}, "train.rank2.log"),  # in sbatch
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, "train.node1.rank0.log"),
    ],
)
def test_every_process_logs_to_a_file_of_its_own(train_config, monkeypatch, env, name):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = train_config()
    assert Path(cfg.hydra.job_logging.handlers.file.filename).name == name


# ---------------------------------------------------------------- speed: FILIP blocks, TF32


@pytest.mark.parametrize("name", ["filip", "clip_filip"])
def test_filip_as_configured_sizes_its_blocks_from_the_batch_not_a_constant(monkeypatch, name):
    from flip.losses import build_loss
    from flip.losses.filip import FilipLoss

    torch.manual_seed(0)
    batch, tokens, dim = 96, 8, 16
    image = torch.nn.functional.normalize(torch.randn(batch, tokens, dim), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(batch, tokens + 2, dim), dim=-1).requires_grad_()
    loss = next(t for t in build_loss(_loss(name)).modules() if isinstance(t, FilipLoss))
    calls = count_filip_blocks(monkeypatch)
    value = loss(image, text, torch.tensor(10.0))
    value.backward()
    assert len(calls) == 1  # the whole 96 x 96 pairs fit one block; backward reuses its arg-maxes
    reference = FilipLoss(topk_fraction=loss.topk_fraction, chunk_size=7, exclude_sot=loss.exclude_sot)
    ref_image, ref_text = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    expected = reference(ref_image, ref_text, torch.tensor(10.0))
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(image.grad, ref_image.grad, rtol=1e-5, atol=1e-6)


def test_filip_blocks_shrink_to_the_free_memory_and_the_result_stays_exact(monkeypatch):
    import flip.losses.filip as filip

    torch.manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(20, 5, 8), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(30, 6, 8), dim=-1).requires_grad_()
    dense = filip.filip_similarity(image, text, chunk_size=1000)
    pair_bytes = 5 * 6 * 4
    monkeypatch.setattr(filip, "free_memory", lambda device: int(4 * pair_bytes * 60))  # 60 pairs a block
    calls = count_filip_blocks(monkeypatch)
    small = filip.filip_similarity(image, text)
    assert len(calls) == 10  # the fewest blocks of at most 60 pairs: 5 x 2 of 4 x 15 (square 7 x 7: 15)
    for got, want in zip(small, dense, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_block_shape_at_the_scale_of_the_issue():
    from flip.losses.filip import block_shape

    # 256 images per GPU against 32 x 256 texts, 50 x 20 tokens kept, fp32, 8 GiB for a block
    rows, cols = block_shape(256, 50, 8192, 20, 4, 8 << 30)
    assert (rows, cols) == (256, 8192)  # one block, where 32-pair blocks were 8 x 256 = 2,048
    rows, cols = block_shape(256, 50, 8192, 20, 4, 1 << 30)
    assert rows == 256 and rows * cols * 50 * 20 * 4 <= 1 << 30 and -(-8192 // cols) == 8
    assert block_shape(10, 10, 10, 10, 4, 1) == (1, 1)  # never an empty block


@pytest.mark.parametrize(
    ("accelerator", "precision", "options", "expected"),
    [
        ("cuda", "32-true", {}, ["high"]),  # the default: TF32 where the user chose 32-bit on GPUs
        ("cuda", "32-true", {"float32_matmul_precision": "highest"}, ["highest"]),
        ("cuda", "32-true", {"float32_matmul_precision": None}, []),
        ("cuda", "bf16-mixed", {}, []),  # autocast already chooses
        ("cpu", "32-true", {}, []),
    ],
)
def test_32_bit_gpu_runs_let_matmuls_use_tf32(monkeypatch, accelerator, precision, options, expected):
    from types import SimpleNamespace

    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    module = FlipLitModule(MODEL, _loss("clip"), OPTIM, **options)
    module._trainer = SimpleNamespace(
        accelerator=CUDAAccelerator() if accelerator == "cuda" else CPUAccelerator(),
        precision=precision, strategy=SimpleNamespace(), world_size=1, global_rank=0,
    )  # fmt: skip
    module.setup("fit")
    assert calls == expected


def test_a_matmul_precision_torch_does_not_know_is_refused_before_training():
    with pytest.raises(ValueError, match=r"float32_matmul_precision='tf32'.*'highest', 'high', 'medium'"):
        FlipLitModule(MODEL, _loss("clip"), OPTIM, float32_matmul_precision="tf32")


def test_the_documented_slurm_script_gives_each_task_its_cpus():
    """Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task: without SRUN_CPUS_PER_TASK
    (or srun --cpus-per-task) each training process, and all its loader workers, get one core."""
    page = (CONF.parent / "docs" / "training.md").read_text()
    script = next(block for block in page.split("```bash") if "#SBATCH" in block).split("```")[0]
    assert "#SBATCH --cpus-per-task=" in script
    srun_at = script.index("\nsrun ")
    before, srun_line = script[:srun_at], script[srun_at:].splitlines()[1]
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in before or "--cpus-per-task" in srun_line
