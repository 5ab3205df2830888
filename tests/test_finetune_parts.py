"""The parts of fine-tuning, each against a computation by hand: LoRA (only adapters learn; the merged
export answers as the adapted model), layer-wise learning-rate decay (every parameter in exactly one
group, at its documented rate), EMA (equal to the average computed step by step), the tasks' losses
and scores, the head's block features, and the training batches (seeded, resumable mid-epoch)."""

from __future__ import annotations

import copy
import re

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flip
from flip.benchmarks.base import LabelledSplit, PixelArrays
from flip.evaluation.tasks import Attributes, Classification, Regression
from flip.export import export
from flip.models.heads import LinearHead, image_features
from flip.training.finetune.data import ResumableBatches, TrainingBatches
from flip.training.finetune.ema import EMA
from flip.training.finetune.module import FinetuneLitModule

HEAD = {"_target_": "flip.models.heads.LinearHead", "_partial_": True}
TASK = {"_target_": "flip.evaluation.tasks.Attributes", "head": HEAD, "names": ["a", "b", "c"]}
OPTIM = {"lr": 1e-2, "weight_decay": 0.05, "betas": [0.9, 0.999], "eps": 1e-8, "warmup_steps": 0,
         "layer_decay": 1.0}  # fmt: skip
LORA = {"method": "lora", "rank": 4, "alpha": 8.0, "target_modules": ["c_fc", "c_proj"],
        "target_parameters": ["in_proj_weight"]}  # fmt: skip


def _module(tiny_model, adapt, **optim) -> FinetuneLitModule:
    torch.manual_seed(0)
    return FinetuneLitModule(
        copy.deepcopy(tiny_model), TASK, adapt, {**OPTIM, **optim}
    )  # eval mode, as loaded


def _fit(module, steps: int, callbacks=()) -> L.Trainer:
    """`steps` optimizer steps on batches of 6 random 32 px images with random attribute targets."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(24, 3, 32, 32, generator=generator)
    targets = torch.randint(0, 2, (24, 3), generator=generator).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=6)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(module, loader)
    return trainer


def test_lora_trains_only_its_adapters_and_the_merged_export_answers_as_the_adapted_model(
    tiny_model, tmp_path
):
    module = _module(tiny_model, LORA)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(".attn.lora_A." in n for n in trainable) and any("c_fc.lora_B" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    images = torch.randn(5, 3, 32, 32)
    base_output = tiny_model.encode_image(images)
    _fit(module, steps=4)
    after = dict(module.named_parameters())
    assert list(after) == list(before)  # the order weight averaging pairs parameters by, kept by forwards
    for name, value in before.items():
        if name in trainable:
            continue
        assert torch.equal(after[name], value), f"{name} changed: only adapters may learn"
    assert all(
        not torch.equal(after[n], before[n]) for n in trainable if "lora_B" in n or n.startswith("head.")
    )

    module.eval()
    with torch.no_grad():
        adapted = module.model.clip.visual(images)
        export(module.adaptation.merged(module.model), tmp_path / "merged", "safetensors")
        reloaded = flip.load(tmp_path / "merged")
        merged = reloaded.encode_image(images)
    assert (adapted - base_output).abs().max() > 1e-3  # the adapters do change what the tower says
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert set(reloaded.state_dict()) == set(tiny_model.state_dict())  # the original architecture
    text = {k: v for k, v in reloaded.state_dict().items() if not k.startswith("clip.visual.")}
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in text.items())


@pytest.mark.parametrize("target", ["attn", "out_proj"])
def test_lora_refuses_torch_attention_as_a_module_and_names_the_weight_to_adapt(tiny_model, target):
    with pytest.raises(
        ValueError,
        match=rf"'transformer\.resblocks\.0\.(attn\.)?{target}'.*MultiheadAttention.*in_proj_weight",
    ):
        _module(tiny_model, {**LORA, "target_modules": [target, "c_fc"]})


def _documented_rate(name: str, blocks: int, lr: float, decay: float) -> float:
    """docs/finetuning.md's table: embeddings depth 0, block i depth i, the rest and the head L + 1."""
    tower = re.sub(r"^model\.clip\.visual\.(base_model\.model\.)?", "", name)
    block = re.search(r"transformer\.resblocks\.(\d+)\.", tower)
    if not name.startswith("model.clip.visual."):
        depth = blocks + 1
    elif block:
        depth = int(block.group(1)) + 1
    elif tower.split(".")[0] in ("conv1", "class_embedding", "positional_embedding", "ln_pre"):
        depth = 0
    else:
        depth = blocks + 1
    return lr * decay ** (blocks + 1 - depth)


@pytest.mark.parametrize("adapt", [{"method": "full"}, LORA, {"method": "frozen"}], ids=lambda a: a["method"])
def test_the_tower_trains_in_train_mode_unless_frozen(tiny_model, adapt):
    module = _module(tiny_model, adapt)
    frozen = adapt["method"] == "frozen"
    assert module.head.training and module.model.clip.visual.training != frozen
    module.eval().train()  # as Lightning switches around validation
    assert module.head.training and all(m.training != frozen for m in module.model.clip.visual.modules())


@pytest.mark.parametrize("adapt", [{"method": "full"}, LORA, {"method": "frozen"}], ids=lambda a: a["method"])
def test_layer_decay_gives_every_trainable_parameter_its_rate_in_exactly_one_group(tiny_model, adapt):
    module = _module(tiny_model, adapt, layer_decay=0.5, lr=0.1)
    blocks = len(tiny_model.clip.visual.transformer.resblocks)
    groups = module.parameter_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    trainable = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ids) == set(trainable), "a trainable parameter is in no group, or a frozen one is in one"
    for group in groups:
        for param in group["params"]:
            name = trainable[id(param)]
            assert group["lr"] == pytest.approx(_documented_rate(name, blocks, 0.1, 0.5), rel=1e-12), name
            no_decay = param.ndim < 2 or name.endswith("bias") or "ln_" in name or "embedding" in name
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    rates = {round(g["lr"], 12) for g in groups}
    expected = {"full": blocks + 2, "lora": blocks + 1, "frozen": 1}[adapt["method"]]  # depths that learn
    assert len(rates) == expected
    if adapt["method"] == "full":
        assert {g["name"] for g in groups} >= {"depth0", "depth0_no_decay", f"depth{blocks + 1}"}


def test_ema_equals_the_average_computed_step_by_step_and_leaves_the_raw_weights(tiny_model):
    class Record(L.Callback):
        def __init__(self) -> None:
            self.weights: list[dict] = []

        def on_train_batch_end(self, trainer, module, *args) -> None:
            self.weights.append({n: p.detach().clone() for n, p in module.named_parameters()})

    module, record, ema = _module(tiny_model, {"method": "full"}), Record(), EMA(decay=0.7)
    _fit(module, steps=5, callbacks=[record, ema])
    assert len(record.weights) == 5
    expected = {n: w.clone() for n, w in record.weights[0].items()}  # the first update copies
    for step in record.weights[1:]:
        for name, value in step.items():
            expected[name] = 0.7 * expected[name] + 0.3 * value
    averaged = dict(ema.averaged().named_parameters())
    moved = 0
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, rtol=0, atol=1e-6)
        moved += not torch.equal(value, record.weights[-1][name])
    assert moved > 10  # the average is not the last weights
    for name, param in module.named_parameters():  # the module ends with its raw weights
        assert torch.equal(param, record.weights[-1][name]), name


def test_block_features_come_from_the_same_pass_as_the_pooled_embedding(tiny_model):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = image_features(tiny_model.clip.visual, images, blocks=(1,))
        pooled = tiny_model.encode_image(images)
        visual = tiny_model.clip.visual
        tokens = visual.transformer(visual._embeds(images))[:, 1:]  # block 1 of 1, class token dropped
    torch.testing.assert_close(features.pooled, pooled)
    grid = 32 // 8
    assert features.blocks[1].shape == (2, 32, grid, grid)
    torch.testing.assert_close(features.blocks[1].flatten(2).transpose(1, 2), tokens)
    assert image_features(visual, images).blocks == {} and LinearHead(32, 3).blocks == ()


def _split(n: int = 10) -> LabelledSplit:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (n, 12, 12, 3), dtype=np.uint8)
    targets = rng.integers(-1, 2, (n, 2)).astype(np.int8)
    return LabelledSplit(
        "made", "train", "attributes", ["x", "y"], targets, PixelArrays(pixels, tuple(map(str, range(n)))),
        [str(i) for i in range(n)],
        questions={"colour": (["red", "green", "blue"], rng.integers(-1, 3, n))},
        values={"age": np.where(rng.random(n) < 0.2, np.nan, rng.uniform(1, 90, n))},
    )  # fmt: skip


def test_each_task_loss_and_score_equal_a_direct_computation():
    split, outputs = _split(), torch.randn(10, 3, generator=torch.Generator().manual_seed(3))
    attributes = Attributes(LinearHead, **Attributes(LinearHead).bind(split))
    y = split.targets.astype(np.float64)
    logits = outputs[:, :2].double().numpy()
    bce = np.logaddexp(0, logits) - y * logits  # -log sigmoid(+-logit)
    labelled = y >= 0
    assert attributes.loss(outputs[:, :2], attributes.targets(split)).item() == pytest.approx(
        bce[labelled].mean()
    )
    scored = attributes.scores(outputs[:, :2], attributes.targets(split))["per_label"]["y"]
    keep = y[:, 1] >= 0
    assert scored["accuracy"] == pytest.approx(((logits[keep, 1] > 0) == (y[keep, 1] == 1)).mean())

    classes = Classification(LinearHead, question="colour")
    classes = Classification(LinearHead, question="colour", **classes.bind(split))
    truth = split.questions["colour"][1]
    keep = truth >= 0
    log_p = torch.log_softmax(outputs.double(), 1).numpy()
    assert classes.loss(outputs, classes.targets(split)).item() == pytest.approx(
        -log_p[keep, truth[keep]].mean()
    )
    confusion = np.zeros((3, 3), int)
    np.add.at(confusion, (truth[keep], outputs.numpy().argmax(1)[keep]), 1)
    assert classes.scores(outputs, classes.targets(split))["confusion_matrix"] == confusion.tolist()

    regression = Regression(LinearHead, value="age")
    regression = Regression(LinearHead, value="age", **regression.bind(split))
    age = split.values["age"]
    keep = np.isfinite(age)
    assert regression.center == pytest.approx(age[keep].mean()) and regression.scale == pytest.approx(
        age[keep].std()
    )
    standard = (age[keep] - age[keep].mean()) / age[keep].std()
    loss = regression.loss(outputs[:, :1], regression.targets(split)).item()
    assert loss == pytest.approx(np.abs(outputs[:, 0].numpy()[keep] - standard).mean(), rel=1e-5)
    predicted = outputs[:, 0].double().numpy() * age[keep].std() + age[keep].mean()
    block = regression.scores(outputs[:, :1], regression.targets(split))["regression"]["age"]
    assert block["mae"] == pytest.approx(np.abs(predicted[keep] - age[keep]).mean(), rel=1e-5)
    with pytest.raises(ValueError, match=r"task=attributes needs binary attributes.*classification"):
        Attributes(LinearHead).bind(LabelledSplit("made", "t", "classification", ["a"], np.zeros(1, np.int64),
                                                  split.images.subset([0]), ["0"]))  # fmt: skip


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_are_seeded_and_resume_after_the_batches_consumed(workers):
    from torchvision.transforms import Compose, RandomResizedCrop, ToTensor

    split = _split(40)
    transform = Compose([RandomResizedCrop(8, scale=(0.3, 1.0)), ToTensor()])

    def loader():
        batches = TrainingBatches(
            split, torch.arange(40), transform, batch_size=4, seed=5, rank=1, world_size=2
        )
        return ResumableBatches(batches, workers)

    whole = loader()
    first = [batch for batch in whole]
    assert len(first) == 5 and whole.state_dict() == {"epoch": 0, "batches": 5}
    order = np.random.default_rng([5, 0]).permutation(40)
    assert first[2][1].tolist() == order[(2 * 2 + 1) * 4 : (2 * 2 + 2) * 4].tolist()  # rank 1's part
    whole.set_epoch(1)
    assert [b[1].tolist() for b in whole] != [b[1].tolist() for b in first]  # a new order each epoch

    torch.manual_seed(123)  # augmentation draws from the sample's own seed, not the global generator
    again = loader()
    again.load_state_dict({"epoch": 0, "batches": 3})
    rest = list(again)
    assert len(rest) == 2 and again.state_dict() == {"epoch": 0, "batches": 5}
    for mine, theirs in zip(rest, first[3:], strict=True):
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
    ended = loader()
    ended.load_state_dict({"epoch": 0, "batches": 5})  # saved at the end of an epoch: the next begins
    assert ended.dataset.epoch == 1 and ended.dataset.skip == 0


def test_the_loss_of_a_batch_without_labels_is_zero_and_keeps_the_graph():
    outputs = torch.randn(3, 2, requires_grad=True)
    for task, targets in (
        (Attributes(LinearHead, names=["a", "b"]), torch.full((3, 2), -1.0)),
        (Classification(LinearHead, classes=["a", "b"]), torch.full((3,), -1)),
        (Regression(LinearHead, center=1.0, scale=2.0), torch.full((3,), float("nan"))),
    ):
        loss = task.loss(outputs, targets)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(outputs.grad, torch.zeros(3, 2))
    assert F.l1_loss(torch.zeros(1), torch.zeros(1)).item() == 0.0
