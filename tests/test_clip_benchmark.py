"""Our metrics.json as CLIP_benchmark result files: each protocol against the JSON CLIP_benchmark's
`eval` would have written for the same figures (written out by hand from its cli.py and metrics/).
tests/test_clip_benchmark_interop.py checks the same against the installed package itself."""

from __future__ import annotations

import json

import pytest

from flip.evaluation.clip_benchmark import clip_benchmark_records, write_clip_benchmark_records

PER_CLASS = {"angry": {"recall": 0.5, "support": 2}, "happy": {"recall": 1.0, "support": 1}}

ZEROSHOT = {
    "benchmark": "fer2013",
    "protocol": "zeroshot",
    "task": "classification",
    "checkpoint": "runs/demo/last.ckpt",
    "split": "test",
    "n_train": 0,
    "n_test": 3,
    "labels": ["angry", "happy"],
    "summary": {"accuracy": 0.6666666666666666, "mean_per_class_recall": 0.75},
    "per_label": PER_CLASS,
    "confusion_matrix": [[1, 1], [0, 1]],
    "skipped": {"test": {}},
}

LINEAR_PROBE = {
    **ZEROSHOT,
    "protocol": "linear_probe",
    "n_train": 40,
    "summary": {"accuracy": 0.8, "mean_per_class_recall": 0.625},
    "l2": 0.01,
    "train_split": "train",
    "val_split": None,
    "fractions": {"1.0": {"fraction": 1.0, "n_train": 40, "summary": {"accuracy": 0.8}}},
    # chosen on the test split: never what the CLIP_benchmark record reports
    "as_published": {"label": "selected on test, as published", "summary": {"accuracy": 0.9}},
}

RETRIEVAL = {
    "benchmark": "celeba_caption",
    "protocol": "retrieval",
    "task": "retrieval",
    "checkpoint": None,
    "split": "test",
    "n_train": 0,
    "n_test": 4,
    "n_texts": 40,
    "labels": [],
    "summary": {"i2t_R@1": 0.25, "i2t_R@5": 0.75, "i2t_R@10": 1.0, "t2i_R@1": 0.125, "t2i_R@5": 0.5},
    "per_label": {},
}


def _expected(text: str) -> dict:
    return json.loads(text)


def test_zero_shot_classification_is_its_acc1_and_mean_per_class_recall():
    [(name, record)] = clip_benchmark_records(ZEROSHOT, "fer2013", "flip-demo", "last.ckpt")
    assert name == "fer2013_last.ckpt_flip-demo_en_zeroshot_classification.json"
    assert record == _expected("""{
        "dataset": "fer2013", "model": "flip-demo", "pretrained": "last.ckpt",
        "task": "zeroshot_classification", "language": "en",
        "metrics": {"acc1": 0.6666666666666666, "mean_per_class_recall": 0.75}
    }""")  # no acc5: metrics.json keeps each image's top class only


def test_linear_probe_reports_the_honest_probe_under_lp_names():
    [(name, record)] = clip_benchmark_records(LINEAR_PROBE, "fer2013", "ViT-B-16", "openai")
    assert name == "fer2013_openai_ViT-B-16_en_linear_probe.json"
    assert record == _expected("""{
        "dataset": "fer2013", "model": "ViT-B-16", "pretrained": "openai",
        "task": "linear_probe", "language": "en",
        "metrics": {"lp_acc1": 0.8, "lp_mean_per_class_recall": 0.625, "normalized": true}
    }""")


def test_retrieval_maps_t2i_to_image_retrieval_and_i2t_to_text_retrieval():
    [(name, record)] = clip_benchmark_records(RETRIEVAL, "celeba_caption", "flip-demo", "", language="en")
    assert name == "celeba_caption__flip-demo_en_zeroshot_retrieval.json"
    assert record == _expected("""{
        "dataset": "celeba_caption", "model": "flip-demo", "pretrained": "",
        "task": "zeroshot_retrieval", "language": "en",
        "metrics": {
            "image_retrieval_recall@1": 0.125, "image_retrieval_recall@5": 0.5,
            "text_retrieval_recall@1": 0.25, "text_retrieval_recall@5": 0.75,
            "text_retrieval_recall@10": 1.0
        }
    }""")
    # the order of the keys is the order of CLIP_benchmark's build columns: K ascending
    assert list(record["metrics"])[2:] == [f"text_retrieval_recall@{k}" for k in (1, 5, 10)]


def test_slashes_in_names_stay_in_the_record_but_not_in_the_file_name():
    [(name, record)] = clip_benchmark_records(ZEROSHOT, "wds/fer2013", "local-dir:/exports/flip", "")
    assert name == "wds_fer2013__local-dir:_exports_flip_en_zeroshot_classification.json"
    assert (record["dataset"], record["model"]) == ("wds/fer2013", "local-dir:/exports/flip")


ATTRIBUTES = {
    **ZEROSHOT,
    "benchmark": "celeba",
    "task": "attributes",
    "summary": {"mean_accuracy": 0.8, "mean_balanced_accuracy": 0.7, "hair_accuracy": 0.5},
    "multiclass": {"hair": {"accuracy": 0.5, "mean_per_class_recall": 0.4}},
}
MULTITASK = {**ZEROSHOT, "benchmark": "utkface", "task": "multitask", "summary": {"gender_accuracy": 0.9}}
VERIFICATION = {"benchmark": "lfw", "protocol": "verification", "task": "verification", "summary": {}}


CANNOT_EXPRESS = {
    "zeroshot-attributes": ATTRIBUTES,
    "probe-attributes": {**ATTRIBUTES, "protocol": "linear_probe"},
    "zeroshot-multitask": MULTITASK,
    "probe-multitask": {**MULTITASK, "protocol": "linear_probe"},
    "verification": VERIFICATION,
    "another-protocol": {**ZEROSHOT, "protocol": "token_probe"},
}


@pytest.mark.parametrize("metrics", CANNOT_EXPRESS.values(), ids=CANNOT_EXPRESS.keys())
def test_what_clip_benchmark_cannot_express_gives_no_record(metrics):
    assert clip_benchmark_records(metrics, "d", "m", "p") == []


def test_a_captioned_split_s_retrieval_comes_from_the_retrieval_protocol_only():
    """A zero-shot run's by-product retrieval is the retrieval protocol's figure: one row, not two."""
    captioned = {**ZEROSHOT, "retrieval": {"i2t_R@5": 1.0, "t2i_R@5": 0.5}}
    [(name, _)] = clip_benchmark_records(captioned, "faces", "m", "p", language="it")
    assert name == "faces_p_m_it_zeroshot_classification.json"
    assert clip_benchmark_records({**ATTRIBUTES, "retrieval": captioned["retrieval"]}, "f", "m", "p") == []


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"non-empty model, got ''"):
        clip_benchmark_records(ZEROSHOT, "fer2013", "", "p")
    with pytest.raises(ValueError, match=r"pretrained must be a string .* got None"):
        clip_benchmark_records(ZEROSHOT, "fer2013", "m", None)
    with pytest.raises(ValueError, match=r"'fer2013' have no summary mean_per_class_recall"):
        clip_benchmark_records({**ZEROSHOT, "summary": {"accuracy": 1.0}}, "fer2013", "m", "p")
    with pytest.raises(ValueError, match=r"'i2t_R5' is not one of ours"):
        clip_benchmark_records({**RETRIEVAL, "summary": {"i2t_R5": 1.0}}, "d", "m", "p")
    with pytest.raises(ValueError, match=r"no summary recalls"):
        clip_benchmark_records({**RETRIEVAL, "summary": {}}, "d", "m", "p")


def test_the_writer_writes_each_record_whole_under_its_name(tmp_path):
    records = [
        *clip_benchmark_records(ZEROSHOT, "d", "m", "p"),
        *clip_benchmark_records(RETRIEVAL, "d", "m", "p"),
    ]
    paths = write_clip_benchmark_records(records, tmp_path / "cb")
    names = [name for name, _ in records]
    assert [p.name for p in paths] == names
    assert sorted(p.name for p in (tmp_path / "cb").iterdir()) == sorted(names)  # no temporaries left
    for path, (_, record) in zip(paths, records, strict=True):
        assert json.loads(path.read_text()) == record
    for bad in ("../escape.json", "sub/x.json", "x.txt", ".."):
        with pytest.raises(ValueError, match=r"plain '\*\.json' name"):
            write_clip_benchmark_records([(bad, {})], tmp_path / "cb")
    assert not (tmp_path / "escape.json").exists()
