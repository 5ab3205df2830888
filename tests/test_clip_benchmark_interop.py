"""The real CLIP_benchmark package (a dev dependency) on a FLIP model exported to an open_clip folder.

As a user would: its own `load_clip` (`--model local-dir:DIR --pretrained ""`), its `fer2013`
builder on a local folder, its zero-shot classifier, predictions and retrieval, computed with its
own functions, equal ours on the same images and prompts; its `build` merges the result files
FLIP writes (flip.evaluation.clip_benchmark) with one it wrote, into the table it makes.
Two upstream bugs stop its own `eval` run on CPU and under numpy 2.4; the test pins them, so the
docs' account of them (docs/evaluation.md, "CLIP_benchmark interop") stays true.
"""

from __future__ import annotations

import colorsys
import csv
import functools
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clip_benchmark import cli
from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
from clip_benchmark.metrics import linear_probe as cb_linear_probe
from clip_benchmark.metrics import zeroshot_retrieval
from clip_benchmark.metrics.zeroshot_classification import (
    accuracy,
    run_classification,
    zero_shot_classifier,
)
from clip_benchmark.models import load_clip
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

import flip
from flip.benchmarks import read_csv_labels, read_folder
from flip.evaluation.benchmark import Benchmark
from flip.evaluation.clip_benchmark import clip_benchmark_records, write_clip_benchmark_records
from flip.evaluation.features import BenchmarkFeatures
from flip.evaluation.linear_probe import LinearProbe
from flip.evaluation.retrieval import Retrieval
from flip.evaluation.run import evaluate
from flip.evaluation.zeroshot import ZeroShot, ZeroShotClassifier
from flip.export import export

from .helpers import ROOT, TINY_ARCH

# the class folders of Kaggle's FER2013 (msambare/fer2013), which CLIP_benchmark's builder reads
FER_FOLDERS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
PER_CLASS = {"train": 4, "test": 3}
CB_RUN = "flip-export-by-clip_benchmark"  # the model name of the file its own run would write
MODEL_SEED = 16  # random towers whose zero-shot answers on these images are not one constant class


def _write_fer_folder(root):
    """ROOT/{train,test}/<class>/*.jpg, 48x48 as FER2013's; each class its own hue (FER's are
    grey), so that even random towers tell some classes apart and the predictions vary."""
    rng = np.random.default_rng(0)
    for split, count in PER_CLASS.items():
        for index, name in enumerate(FER_FOLDERS):
            (root / split / name).mkdir(parents=True)
            colour = np.array(colorsys.hsv_to_rgb(index / len(FER_FOLDERS), 0.8, 0.9)) * 255
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 20, size=(48, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{split}_{i:04d}.jpg")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random-weight FLIP model (the tiny test towers) as an open_clip folder, and FER data."""
    from flip.models import build_model

    tmp = tmp_path_factory.mktemp("cb_interop")
    torch.manual_seed(MODEL_SEED)
    export(build_model("flip-test-tiny", TINY_ARCH).eval(), tmp / "flip-open_clip", "open_clip")
    _write_fer_folder(tmp / "fer2013")
    return tmp


def _ours(folder, root, templates, classnames):
    """FLIP's model (flip.load of the same export) and its zero-shot benchmark on the same folder
    and prompts: CLIP_benchmark's `{c}` templates are ours with `{}`, one phrase per class."""
    model = flip.load(folder)
    benchmark = Benchmark(
        name="fer2013",
        reader=functools.partial(read_folder, root),
        prompts={
            "templates": [t.replace("{c}", "{}") for t in templates],
            "classes": {folder: [name] for folder, name in zip(FER_FOLDERS, classnames, strict=True)},
        },
        train_split="train",
        val_split=None,
        test_split="test",
    )
    return model, benchmark


def test_clip_benchmark_on_a_flip_export_equals_flip_and_its_build_merges_our_results(exported):
    folder, root = exported / "flip-open_clip", exported / "fer2013"
    # its loader, exactly as `clip_benchmark eval --model local-dir:DIR --pretrained "" --no_amp` calls it
    cb_model, transform, tokenizer = load_clip(
        model_type="open_clip", model_name=f"local-dir:{folder}", pretrained="", cache_dir=None, device="cpu"
    )
    cb_model.eval()
    dataset = build_dataset(
        dataset_name="fer2013", root=str(root), transform=transform, split="test", download=True,
        language="en", task="zeroshot_classification",
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=8, shuffle=False, num_workers=0, collate_fn=get_dataset_collate_fn("fer2013")
    )
    theirs = zero_shot_classifier(cb_model, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False)
    logits, target = run_classification(cb_model, theirs, loader, "cpu", amp=False)

    model, benchmark = _ours(folder, root, dataset.templates, dataset.classes)
    split = BenchmarkFeatures(model, benchmark, progress=False)()
    prompts = benchmark.prompts
    ours = ZeroShotClassifier.from_prompts(model, prompts["templates"], None, {"class": prompts["classes"]})
    class_names, weights = ours.multiclass["class"]
    assert class_names == list(FER_FOLDERS) == split.split.label_names  # ImageFolder's order is ours
    assert theirs.shape == weights.T.shape
    assert (theirs - weights.T).abs().max() <= 1e-5
    assert torch.equal(target, torch.as_tensor(split.split.targets))
    # its logits are 100 x cosine similarity; ours the model's logit scale x the same cosines
    cosines = split.features @ weights.T
    assert (logits / 100.0 - cosines).abs().max() <= 1e-5
    probabilities = (logits / 100.0 * ours.logit_scale).softmax(dim=-1)
    assert (probabilities - ours.predict(split.features)["class"]).abs().max() <= 1e-5
    assert torch.equal(logits.argmax(dim=-1), cosines.argmax(dim=-1))
    assert len(set(logits.argmax(dim=-1).tolist())) >= 4  # varied answers: a class-order mistake would show

    # upstream bug 1: its accuracy() calls float() on a one-element array, which numpy >= 2.4 refuses
    with pytest.raises(TypeError, match="only 0-dimensional arrays can be converted to Python scalars"):
        accuracy(logits, target, topk=(1, 5))
    acc1, acc5 = _accuracy_as_patched(logits, target, topk=(1, 5))
    mean_per_class_recall = balanced_accuracy_score(target, logits.argmax(axis=1))  # as its evaluate()
    # upstream bug 2: its linear probe refuses any device but CUDA before it does anything
    with pytest.raises(AssertionError):
        cb_linear_probe.evaluate(cb_model, loader, loader, -1, 8, 0, 0.1, 1, "m", 0, str(exported), "cpu")

    results = evaluate(
        model, benchmark, {"zeroshot": ZeroShot(), "linear_probe": _probe()}, progress=False
    )  # fmt: skip
    retrieval, cb_retrieval = _retrieval_both_ways(exported, model, cb_model, transform, tokenizer)
    model_name, records = f"local-dir:{folder}", []
    for metrics in [*results.values(), retrieval]:
        records += clip_benchmark_records(metrics, "fer2013", model_name, "")
    by_task = {record["task"]: record["metrics"] for _, record in records}
    assert by_task["zeroshot_classification"] == pytest.approx(
        {"acc1": acc1, "mean_per_class_recall": mean_per_class_recall}, abs=1e-12
    )
    assert by_task["zeroshot_retrieval"] == pytest.approx(cb_retrieval, abs=1e-12)
    probe = results["linear_probe"]["summary"]
    assert by_task["linear_probe"] == {
        "lp_acc1": probe["accuracy"],
        "lp_mean_per_class_recall": probe["mean_per_class_recall"],
        "normalized": True,
    }

    # its `build` merges our files (a suite's flat clip_benchmark/ folder) with one its own `eval`
    # would have written (had accuracy() run) for the same export, under another model name
    ours_dir, runs_dir = exported / "suite" / "clip_benchmark", exported / "clip_benchmark_runs"
    write_clip_benchmark_records(records, ours_dir)
    cb_metrics = {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": float(mean_per_class_recall)}
    runs_dir.mkdir()
    (runs_dir / f"fer2013__{CB_RUN}_en_zeroshot_classification.json").write_text(
        json.dumps({"dataset": "fer2013", "model": CB_RUN, "pretrained": "",
                    "task": "zeroshot_classification", "metrics": cb_metrics, "language": "en"})
    )  # fmt: skip
    table = exported / "benchmark.csv"
    cell = (
        exported / "cell"
    )  # a suite cell folder: its metrics.json stops build (why the suite writes a flat folder)
    write_clip_benchmark_records(records, cell)
    (cell / "metrics.json").write_text(json.dumps(results["zeroshot"]))
    with pytest.raises(KeyError, match="metrics"):
        _clip_benchmark(["build", str(cell), "--output", str(table)])
    _clip_benchmark(["build", str(ours_dir), str(runs_dir), "--output", str(table)])
    with table.open(newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = set(reader.fieldnames), list(reader)
    assert columns == {
        "dataset", "model", "pretrained", "task", "language", "model_fullname",
        "acc1", "acc5", "mean_per_class_recall", "lp_acc1", "lp_mean_per_class_recall", "normalized",
        *(f"{kind}_retrieval_recall@{k}" for kind in ("image", "text") for k in (1, 5, 10)),
    }  # fmt: skip
    rows = {(row["model"], row["task"]): row for row in rows}
    assert sorted(rows) == [
        (CB_RUN, "zeroshot_classification"),
        (model_name, "linear_probe"),
        (model_name, "zeroshot_classification"),
        (model_name, "zeroshot_retrieval"),
    ]
    for (name, task), row in rows.items():
        record = {"model": name, "task": task, "dataset": "fer2013", "pretrained": "", "language": "en"}
        values = cb_metrics if name == CB_RUN else by_task[task]
        expected = {**{k: "" for k in columns}, **record, **{k: str(v) for k, v in values.items()}}
        assert row == {**expected, "model_fullname": f"{name} "}, (name, task)
    # the same figures in one table, whichever side computed them
    ours_row, their_row = (rows[(m, "zeroshot_classification")] for m in (model_name, CB_RUN))
    for metric in ("acc1", "mean_per_class_recall"):
        assert float(ours_row[metric]) == pytest.approx(float(their_row[metric]), abs=1e-12)


def _clip_benchmark(argv: list[str]) -> None:
    """Its console script `clip_benchmark`, with these arguments."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["clip_benchmark", *argv])
        cli.main()


def _documented_commands() -> list[list[str]]:
    """The `clip_benchmark` lines of docs/evaluation.md's shell blocks, continuations joined."""
    text = (ROOT / "docs" / "evaluation.md").read_text().replace("\\\n", " ")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("clip_benchmark ")]
    return [shlex.split(line.replace("$PWD", "/work"))[1:] for line in lines]


def test_the_documented_clip_benchmark_commands_are_the_ones_this_test_runs(monkeypatch):
    commands = {argv[0]: argv for argv in _documented_commands()}
    assert sorted(commands) == ["build", "eval"]
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", *commands["eval"]])
    _, args = cli.get_parser_args()  # its own parser
    assert (args.model_type, args.task, args.dataset, args.pretrained) == (
        "open_clip", "zeroshot_classification", ["fer2013"], [""]
    )  # fmt: skip
    assert args.model[0].startswith("local-dir:/") and args.amp is False
    assert "{model}" not in args.output  # its default name would hold the folder's slashes
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", *commands["build"]])
    _, args = cli.get_parser_args()
    assert args.which == "build"
    assert [Path(path).name for path in args.files] == ["clip_benchmark", "clip_benchmark_runs"]  # folders


def _probe() -> LinearProbe:
    return LinearProbe(train_split="train", fractions=[1.0], l2_grid=[1.0, 0.01], max_iter=50)


def _accuracy_as_patched(output, target, topk):
    """CLIP_benchmark's accuracy() with the one-line fix docs/evaluation.md suggests: the count
    as a Python number (`.item()`) instead of float() of a one-element numpy array."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def _retrieval_both_ways(exported, model, cb_model, transform, tokenizer):
    """Our retrieval protocol and CLIP_benchmark's zeroshot_retrieval on the same test images,
    each with its own caption (distinct captions: no ties, which the two break differently)."""
    images = sorted((exported / "fer2013" / "test").rglob("*.jpg"))
    captions = [f"photo {i} of a face looking {p.parent.name}" for i, p in enumerate(images)]
    table = exported / "captions"
    table.mkdir(exist_ok=True)
    with (table / "test.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "caption"])
        writer.writerows([str(p), p.parent.name, c] for p, c in zip(images, captions, strict=True))
    benchmark = Benchmark(
        name="fer2013", reader=functools.partial(read_csv_labels, table), prompts={}, test_split="test"
    )
    ours = evaluate(model, benchmark, {"retrieval": Retrieval()}, progress=False)["retrieval"]

    pairs = [(transform(Image.open(p).convert("RGB")), [c]) for p, c in zip(images, captions, strict=True)]
    loader = torch.utils.data.DataLoader(
        pairs, batch_size=8, shuffle=False, collate_fn=get_dataset_collate_fn("flickr30k")
    )
    theirs = zeroshot_retrieval.evaluate(
        cb_model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10]
    )
    return ours, theirs
