"""DeepSpeed ZeRO through Lightning, and ZeRO checkpoints back to one fp32 file.

`DeepSpeedStrategy` is Lightning's, with three differences:
- it also runs on the CPU accelerator (DeepSpeed's CPU backend over gloo). Lightning refuses the
  CPU outright, which would leave the ZeRO configs in `conf/trainer/` untestable on a machine
  without a GPU;
- DeepSpeed 0.19 fails at engine start on 0-dim parameters such as CLIP's temperature; those
  are broadcast apart, on the engine's device (ZeRO-3 stores them 1-d, see
  `FlipModel.prepare_for_zero3`);
- a save never overwrites the previous checkpoint in place (one tag folder per save, `latest`
  moved atomically when every rank has written).

A ZeRO checkpoint is a folder of per-rank shards (`last.ckpt/<tag>/*.pt` + `latest`). Evaluation,
`flip.load` and export want one file of fp32 weights: `consolidate` writes it, atomically, with
the hyperparameters that `flip.load` needs to rebuild the towers, and nothing that would need
`weights_only=False` to read back.

DeepSpeed reads its shards with `torch.load(weights_only=False)`, in its engine and in its
`zero_to_fp32`: a crafted shard would run code. Every load of a ZeRO checkpoint, resume and
conversion alike, happens inside `weights_only_loads`, which makes each `torch.load` of that
call a `weights_only=True` one that allows, beyond tensors and containers, only the few plain
classes DeepSpeed pickles (`DEEPSPEED_PICKLED_CLASSES`).

    flip-zero-to-fp32 logs/train/runs/<date>/checkpoints/last.ckpt model.ckpt
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy

from flip.atomic import atomic_write_text
from flip.checkpoint import atomic_torch_save, read_checkpoint

# what a consolidated file keeps of Lightning's client state: enough to rebuild and to know its age
KEPT_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters")
FORWARD_PREFIX = "_forward_module."
MODULE_PREFIX = "model."  # FlipLitModule.model
ZERO3_SCALARS_KEY = "flip_zero3_scalar_parameters"  # written by FlipLitModule.on_save_checkpoint
ZERO_EXPECTED = "a DeepSpeed ZeRO shard written by a trainer=deepspeed_zero2/deepspeed_zero3 run"
# Besides tensors and containers, DeepSpeed 0.19 pickles these into its optimizer shards (found
# by reading the pickles of real ZeRO-2 and ZeRO-3 checkpoints, fp32 and bf16). Each is a plain
# record: rebuilding one sets numbers, it runs nothing. Any other class in a shard is refused.
DEEPSPEED_PICKLED_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's `DeepSpeedStrategy`, also on the CPU accelerator (gloo); see the module doc.

    On the CPU the device-index checks, which assume one GPU per process, are skipped, and
    DeepSpeed gets device index 0 of the CPU.
    """

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            super().setup_environment()
            return
        # Lightning's DDP setup (world ranks, process group via DeepSpeed), without the CUDA check
        super(_LightningDeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            super().setup_distributed()
            return
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        return "gloo" if self._on_cpu() else super()._get_process_group_backend()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        with _scalar_parameters_broadcast_apart(model):
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def _auto_select_batch_size(self) -> int:
        """DeepSpeed's `train_micro_batch_size_per_gpu` (its throughput logs and `train_batch_size`):
        the batch each rank trains on. FLIP's loaders batch inside the webdataset pipeline, so the
        DataLoader has no batch sampler for Lightning to read; the data module knows the size."""
        trainer = self.lightning_module.trainer
        size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
        source = trainer.fit_loop._data_source
        loader = source.dataloader() if source.is_defined() else None
        sampler = getattr(loader, "batch_sampler", None)
        return getattr(sampler, "batch_size", None) or getattr(loader, "batch_size", None) or 1

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        """Each save goes to a new tag folder; `latest` moves to it (atomically) once every rank
        has written its shard, and older tags are removed after. Lightning's version rewrites
        one folder in place, so a job killed mid-save would lose the previous checkpoint too."""
        if storage_options is not None:
            raise TypeError(
                f"DeepSpeedStrategy.save_checkpoint takes no storage_options, got {storage_options!r}"
            )
        filepath = self.broadcast(str(filepath))
        tag = self.broadcast(f"step{checkpoint.get('global_step', 0):09d}-{time.time_ns()}")
        client_state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        self.deepspeed_engine.save_checkpoint(
            filepath,
            client_state=client_state,
            tag=tag,
            save_latest=False,
            exclude_frozen_parameters=self.exclude_frozen_parameters,
        )
        self.barrier("deepspeed_checkpoint_written")
        if self.is_global_zero:
            atomic_write_text(Path(filepath) / "latest", tag)
            for old in Path(filepath).iterdir():
                if old.is_dir() and old.name != tag and any(old.glob("*model_states.pt")):
                    shutil.rmtree(old, ignore_errors=True)
        self.barrier("deepspeed_checkpoint_done")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning checks for its fixed tag folder `checkpoint`; saves here use one tag per save
        and the `latest` file, which DeepSpeed's own loading follows. Every file is read with
        `weights_only=True`, whichever of DeepSpeed's or Lightning's loaders reads it."""
        with weights_only_loads():
            return self._load_checkpoint(checkpoint_path, weights_only)

    def _load_checkpoint(self, checkpoint_path, weights_only: bool | None) -> dict[str, Any]:
        if (self.load_full_weights and self.zero_stage_3) or not is_zero_checkpoint(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, True)
        from lightning.pytorch.trainer.states import TrainerFn

        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        _, client_state = self.deepspeed_engine.load_checkpoint(
            str(checkpoint_path),
            load_optimizer_states=fitting,
            load_lr_scheduler_states=False,
            load_module_strict=self.lightning_module.strict_loading,
        )
        if client_state is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {str(checkpoint_path)!r}")
        return client_state

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed's engine reads the device index of the root device; the CPU has no index
        return torch.device("cpu", 0) if self._on_cpu() else super().root_device


@contextmanager
def _scalar_parameters_broadcast_apart(model: torch.nn.Module) -> Iterator[None]:
    """Work around DeepSpeed 0.19 failing at engine start on 0-dim parameters (CLIP's logit_scale).

    The engine broadcasts every parameter from rank 0 as `p.data.view(torch.uint8)`, which torch
    refuses for a 0-dim tensor. Those few parameters are flagged for the engine's loop to pass
    over (it skips parameters that carry `ds_optim_param`), and broadcast right after it, in the
    engine's own broadcast step: the model is on the engine's device by then (NCCL has no CPU
    backend, so a broadcast before `deepspeed.initialize` fails on GPUs), and the optimizer,
    built after that step, copies the broadcast values into its fp32 master weights.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    scalars = [p for p in model.parameters() if p.dim() == 0]
    if not scalars:
        yield
        return
    engine_broadcast = getattr(DeepSpeedEngine, "_broadcast_model", None)
    if engine_broadcast is None:
        raise RuntimeError(
            "this DeepSpeed has no DeepSpeedEngine._broadcast_model, where FLIP broadcasts its 0-dim "
            "parameters (logit_scale, logit_bias); use the DeepSpeed version pinned in "
            "requirements/constraints.txt"
        )

    def broadcast_model(engine: DeepSpeedEngine) -> None:
        engine_broadcast(engine)
        if engine.dist_backend is None:  # the engine broadcasts nothing either (one process)
            return
        import deepspeed.comm as dist
        from deepspeed.utils import groups

        for p in scalars:
            dist.broadcast(p.data, groups._get_broadcast_src_rank(), group=engine.seq_data_parallel_group)

    for p in scalars:
        p.ds_optim_param = True
    DeepSpeedEngine._broadcast_model = broadcast_model
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = engine_broadcast
        for p in scalars:
            del p.ds_optim_param


def deepspeed_pickled_classes() -> list[type]:
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_PICKLED_CLASSES]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every `torch.load` reads with `weights_only=True`, DeepSpeed's own calls included.

    DeepSpeed passes `weights_only=False` explicitly (its checkpoint engine, `zero_to_fp32`,
    the ZeRO optimizers), so neither torch's default nor an argument of ours reaches those
    calls; `torch.load` itself is replaced for the duration of the call instead. Loads of a
    path also get `read_checkpoint`'s errors naming the file.
    """
    allowed = deepspeed_pickled_classes()
    original = torch.load

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        if isinstance(f, (str, os.PathLike)) and not kwargs:
            return read_checkpoint(f, ZERO_EXPECTED, map_location, allowed, mmap=mmap)
        with torch.serialization.safe_globals(allowed):
            return original(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)

    torch.load = torch.serialization.load = load
    try:
        yield
    finally:
        torch.load = torch.serialization.load = original


def is_zero_checkpoint(path: str | os.PathLike) -> bool:
    """A DeepSpeed checkpoint is a folder with a `latest` tag file; Lightning's is one file."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "latest"))


def consolidate(checkpoint_dir: str | os.PathLike, output_file: str | os.PathLike) -> dict[str, Any]:
    """Gather a ZeRO-2/3 checkpoint folder into one fp32 checkpoint that `flip.load` reads.

    The shards are read with `weights_only=True` (see `weights_only_loads`); the output holds
    tensors and plain containers only.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_files
    from lightning.pytorch.utilities.deepspeed import ds_checkpoint_dir

    if not is_zero_checkpoint(checkpoint_dir):
        raise FileNotFoundError(
            f"{str(checkpoint_dir)!r} is not a DeepSpeed checkpoint folder (one with a 'latest' file); "
            "give the last.ckpt folder written by a trainer=deepspeed_zero2/deepspeed_zero3 run"
        )
    with weights_only_loads():
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
        # rank 0's model-state file holds Lightning's client state (ZeRO-2 and ZeRO-3 name it differently)
        model_file = get_model_state_files(ds_checkpoint_dir(str(checkpoint_dir)))[0]
        client_state = read_checkpoint(model_file, ZERO_EXPECTED)
    checkpoint = {key: client_state[key] for key in KEPT_KEYS if key in client_state}
    state_dict = {key.removeprefix(FORWARD_PREFIX): value.float() for key, value in state_dict.items()}
    # ZeRO-3 trained 0-dim parameters as 1-element ones (FlipModel.prepare_for_zero3): undo that
    for name in client_state.get(ZERO3_SCALARS_KEY, []):
        key = MODULE_PREFIX + name
        if key in state_dict:
            state_dict[key] = state_dict[key].reshape(())
    checkpoint["state_dict"] = state_dict
    atomic_torch_save(checkpoint, output_file)
    return checkpoint


def model_for_evaluation(
    module: torch.nn.Module, checkpoint: str | None
) -> tuple[torch.nn.Module, str | None]:
    """The trained towers, whole and in fp32, with the checkpoint they come from.

    After a ZeRO run the weights in memory are shards (ZeRO-3) or in the training precision;
    the last checkpoint is consolidated beside itself (`last.ckpt` -> `last.fp32.ckpt`) and
    loaded from there. Otherwise it is the module's own model.
    """
    if checkpoint is None or not is_zero_checkpoint(checkpoint):
        return module.model, checkpoint
    from flip.checkpoint import load

    single = str(Path(checkpoint).with_suffix("")) + ".fp32.ckpt"
    consolidate(checkpoint, single)
    return load(single, device=module.device), single


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Gather a DeepSpeed ZeRO checkpoint into one fp32 FLIP checkpoint."
    )
    parser.add_argument("checkpoint_dir", help="the .ckpt folder a DeepSpeed run wrote")
    parser.add_argument("output_file", help="where to write the single-file checkpoint (for flip.load)")
    args = parser.parse_args(argv)
    checkpoint = consolidate(args.checkpoint_dir, args.output_file)
    print(
        f"wrote {Path(args.output_file)} ({len(checkpoint['state_dict'])} tensors, "
        f"step {checkpoint.get('global_step')})"
    )


if __name__ == "__main__":
    main()
