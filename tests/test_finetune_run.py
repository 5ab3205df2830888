"""finetune.py's run, through the composed config: a LoRA fine-tune with EMA from a trained checkpoint
exports and evaluates both weights (metrics equal to a direct computation with the exported files),
each task on its benchmark, a fine-tune stopped by SIGTERM and resumed ends with the weights of one
that was not, and LoRA trains under DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import flip
from flip.benchmarks import read_faceshapes, read_folder, read_utkface
from flip.training.finetune.run import finetune
from flip.training.preemption import Preempted

from .helpers import compose_finetune_config, csv_losses
from .helpers.demographics import write_utkface


def _logits(run: Path, images, suffix: str = "") -> np.ndarray:
    """The exported model's embedding times the exported head's weights, image by image."""
    model = flip.load(run / f"model{suffix}")
    head = load_file(str(run / f"head{suffix}.safetensors"))
    with torch.no_grad():
        pooled = torch.cat(
            [model.encode_image(model.preprocess(images.load(i))[None]) for i in range(len(images))]
        )
    return (pooled @ head["linear.weight"].T + head["linear.bias"]).double().numpy()


def test_a_lora_fine_tune_with_ema_exports_and_evaluates_both_weights_labelled(trained_demo, tmp_path):
    cfg = compose_finetune_config(
        tmp_path,
        [f"ckpt={trained_demo.ckpt}", f"benchmark.root={trained_demo.faceshapes}", "adapt=lora",
         "adapt.rank=4", "ema.decay=0.5", "trainer.max_steps=7", "optim.lr=0.01"],
    )  # fmt: skip
    results = finetune(cfg)
    run = tmp_path / "run"
    assert "val/mean_balanced_accuracy" in results["train"]  # validated after the first epoch (6 steps)
    test = read_faceshapes(trained_demo.faceshapes, "test")
    start = flip.load(trained_demo.ckpt).state_dict()
    for suffix, weights in (("", "raw"), ("_ema", "ema")):
        metrics = json.loads((run / f"eval{suffix}" / "metrics.json").read_text())
        assert metrics["adaptation"] == {"method": "lora", "rank": 4, "label": "LoRA r=4"}
        assert (metrics["protocol"], metrics["task"], metrics["weights"]) == (
            "finetune",
            "attributes",
            weights,
        )
        assert metrics["n_test"] == len(test) and metrics["checkpoint"] == str(run / f"model{suffix}")
        assert "adaptation: LoRA r=4" in (run / f"eval{suffix}" / "report.md").read_text()
        decided = _logits(run, test.images, suffix) > 0
        for a, name in enumerate(test.label_names):
            labelled = test.targets[:, a] >= 0
            direct = (decided[labelled, a] == (test.targets[labelled, a] == 1)).mean()
            assert metrics["per_label"][name]["accuracy"] == pytest.approx(direct), name
        exported = flip.load(run / f"model{suffix}").state_dict()
        assert set(exported) == set(start)  # the original architecture: the adapters are merged
        for key, value in exported.items():  # the text tower and the temperature are the checkpoint's
            if not key.startswith("clip.visual."):
                assert torch.equal(value, start[key]), key
        assert any(not torch.equal(v, start[k]) for k, v in exported.items() if k.startswith("clip.visual."))
    with safe_open(str(run / "head.safetensors"), "pt") as head:
        described = head.metadata()
    assert json.loads(described["task"])["names"] == test.label_names
    assert json.loads(described["adaptation"])["label"] == "LoRA r=4"
    assert not trained_demo.changes()


def _classes(tmp_path, folder_benchmark):
    overrides = ["task=classification", "benchmark=folder", f"benchmark.root={folder_benchmark}",
                 "optim.layer_decay=0.7", "data.batch_size=8"]  # fmt: skip
    return overrides, read_folder(folder_benchmark, "test")


def _ages(tmp_path, folder_benchmark):
    root = tmp_path / "utk"
    write_utkface(root / "UTKFace")
    overrides = ["task=regression", "benchmark=utkface", f"benchmark.root={root}", "data.batch_size=4"]
    return overrides, read_utkface(root, "test")


@pytest.mark.parametrize("benchmark", [_classes, _ages], ids=["classification", "regression"])
def test_each_task_trains_on_its_benchmark_and_scores_as_computed_directly(
    tmp_path, folder_benchmark, benchmark
):
    overrides, test = benchmark(tmp_path, folder_benchmark)
    results = finetune(compose_finetune_config(tmp_path, [*overrides, "trainer.max_steps=3"]))
    metrics = results["eval"]
    logits = _logits(tmp_path / "run", test.images)
    if metrics["task"] == "classification":
        confusion = np.zeros((len(test.label_names),) * 2, dtype=int)
        np.add.at(confusion, (test.targets, logits.argmax(1)), 1)
        assert metrics["confusion_matrix"] == confusion.tolist()
        assert metrics["summary"]["accuracy"] == pytest.approx(np.trace(confusion) / len(test))
    else:
        task = json.loads(safe_open(str(tmp_path / "run" / "head.safetensors"), "pt").metadata()["task"])
        age = test.values["age"]
        predicted = logits[:, 0] * task["scale"] + task["center"]
        assert metrics["task"] == "regression" and metrics["labels"] == ["age"]
        assert metrics["summary"]["age_mae"] == pytest.approx(np.abs(predicted - age).mean(), rel=1e-5)
        assert (tmp_path / "run" / "eval" / "age_scatter.png").is_file()
    assert metrics["adaptation"]["label"] == "full"


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["ema.decay=0.9", "trainer=deepspeed_zero2"], r"ema.decay=0.9 under DeepSpeed.*ema.decay=null"),
        (["optim.layer_decay=1.5"], r"optim.layer_decay=1.5 must be in \(0, 1\]"),
        (["adapt.method=lorra"], r"adapt.method='lorra': use one of \['frozen', 'full', 'lora'\]"),
        (["benchmark=lfw", "benchmark.root=/x"], r"benchmark=lfw has no train split"),
        (["ckpt=/no/such.ckpt"], r"ckpt='/no/such.ckpt' does not exist"),
    ],
)
def test_a_wrong_setting_fails_before_any_work_naming_it(tmp_path, overrides, error):
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        finetune(compose_finetune_config(tmp_path, overrides))
    assert not (tmp_path / "run").exists()


class SigtermAt(L.Callback):
    """Sends this process SIGTERM, as a scheduler preempting the job would, before step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_fine_tune_stopped_by_sigterm_resumes_to_the_weights_of_an_uninterrupted_one(
    trained_demo, tmp_path
):
    overrides = [
        f"benchmark.root={trained_demo.faceshapes}", "data.max_train=48", "data.num_workers=2",
        "task.head.dropout=0.2", "ema.decay=0.5", "trainer.max_steps=7", "evaluate=false",
        "callbacks.model_checkpoint.every_n_train_steps=1000",  # the only checkpoint: the preemption's
    ]  # fmt: skip
    finetune(compose_finetune_config(tmp_path / "whole", overrides))
    kill = "+callbacks.kill={_target_: tests.test_finetune_run.SigtermAt, step: 4}"  # in epoch 1 of 3 batches
    with pytest.raises(Preempted) as stopped:
        finetune(compose_finetune_config(tmp_path / "split", [*overrides, kill]))
    assert stopped.value.code == 128 + signal.SIGTERM and stopped.value.step == 5
    last = tmp_path / "split" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 2}
    ]
    finetune(compose_finetune_config(tmp_path / "split", [*overrides, "ckpt_path=auto"]))
    whole, split = (torch.load(p / "run" / "checkpoints" / "last.ckpt", weights_only=True) for p in
                    (tmp_path / "whole", tmp_path / "split"))  # fmt: skip
    assert whole["global_step"] == split["global_step"] == 7
    for key in ("state_dict", "current_model_state"):  # the EMA and the raw weights
        assert whole[key].keys() == split[key].keys()
        for name, value in whole[key].items():
            assert torch.equal(value, split[key][name]), (key, name)
    expected, after = csv_losses(tmp_path / "whole" / "run"), csv_losses(tmp_path / "split" / "run", 1)
    assert sorted(expected) == list(range(7)) and sorted(after) == [5, 6]  # continued, not restarted
    assert all(after[step] == expected[step] for step in after)


@pytest.mark.slow
def test_a_lora_fine_tune_under_deepspeed_zero2_exports_its_fp32_weights(
    trained_demo, tmp_path, deepspeed_on_cpu
):
    overrides = [
        f"ckpt={trained_demo.ckpt}", f"benchmark.root={trained_demo.faceshapes}", "adapt=lora",
        "evaluate=false", "trainer=deepspeed_zero2", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.precision=32-true", "trainer.max_steps=2", "optim.lr=0.05",
    ]  # fmt: skip
    finetune(compose_finetune_config(tmp_path, overrides))
    run = tmp_path / "run"
    single = torch.load(run / "checkpoints" / "last.fp32.ckpt", weights_only=True)["state_dict"]
    exported, start = flip.load(run / "model").state_dict(), flip.load(trained_demo.ckpt).state_dict()
    assert set(exported) == set(start)
    lora = [k for k in single if "lora_B" in k]
    assert lora and all(single[k].abs().sum() > 0 for k in lora)  # the adapters trained, and are merged
    assert any(not torch.equal(exported[k], start[k]) for k in exported if k.startswith("clip.visual."))
    with pytest.raises(ValueError, match="ZeRO-3 is not supported"):
        finetune(compose_finetune_config(tmp_path / "z3", [*overrides, "trainer=deepspeed_zero3"]))
