"""Benchmark readers on small fixtures written in each dataset's published layout."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from flip.benchmarks import (
    MalformedFileError,
    read_affectnet,
    read_celeba_split,
    read_csv_labels,
    read_faceshapes,
    read_fer2013,
    read_folder,
    read_labelled_shards,
    read_lfwa,
    read_rafdb,
)
from flip.benchmarks.celeba import CELEBA_ATTRIBUTES, CelebAFormatError
from flip.benchmarks.csv_labels import csv_splits

from .helpers import write_caption_shards, write_image


def _attribute_file(path, names, rows):
    """CelebA's text layout: count line, header, values right-aligned in 2-wide columns."""
    lines = [str(len(rows)), " ".join(names) + " "]
    for name, values in rows:
        lines.append(name + " " + " ".join(f"{v:>2d}" for v in values))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# -- CelebA and LFWA -----------------------------------------------------------------------------


def _celeba(root, official=True):
    rng = np.random.default_rng(0)
    names = [f"{i:06d}.jpg" for i in range(1, 8)]
    values = rng.choice([-1, 1], size=(len(names), 40))
    partition = [0, 0, 0, 1, 1, 2, 2]
    anno, evaldir, img = (
        (root / "Anno", root / "Eval", root / "Img" / "img_align_celeba") if official else (root,) * 3
    )
    _attribute_file(anno / "list_attr_celeba.txt", CELEBA_ATTRIBUTES, list(zip(names, values, strict=True)))
    evaldir.mkdir(parents=True, exist_ok=True)
    (evaldir / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, partition, strict=True))
    )
    for n in names:
        write_image(img / n)
    return names, values, partition


@pytest.mark.parametrize("official", [True, False])
def test_celeba_splits_labels_and_counts(tmp_path, official):
    names, values, partition = _celeba(tmp_path, official)
    for code, split in enumerate(("train", "val", "test")):
        s = read_celeba_split(tmp_path, split)
        rows = [i for i, p in enumerate(partition) if p == code]
        assert s.task == "attributes" and s.label_names == list(CELEBA_ATTRIBUTES)
        assert s.keys == [names[i] for i in rows]
        np.testing.assert_array_equal(s.targets, (values[rows] == 1).astype(np.int8))
        assert s.counts()["Eyeglasses"] == int((values[rows, 15] == 1).sum())
        assert s.images.load(0).size == (12, 10)


def test_celeba_malformed_line_names_file_and_line(tmp_path):
    _celeba(tmp_path)
    path = tmp_path / "Anno" / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0]  # a value short
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CelebAFormatError, match=r"list_attr_celeba.txt line 5: expected a file name and 40"):
        read_celeba_split(tmp_path, "train")


def test_lfwa_reads_the_celeba_text_layout_with_a_split_file(tmp_path):
    names = ["Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Abba_Eban/Abba_Eban_0001.jpg", "Zoe/Zoe_0002.jpg"]
    values = np.array([[1] * 40, [-1] * 40, [1, -1] * 20])
    _attribute_file(tmp_path / "list_attr_lfwa.txt", CELEBA_ATTRIBUTES, list(zip(names, values, strict=True)))
    (tmp_path / "list_eval_partition_lfwa.txt").write_text(f"{names[0]} 0\n{names[1]} 2\n{names[2]} 0\n")
    for n in names:
        write_image(tmp_path / "lfw" / n)
    train, test = read_lfwa(tmp_path, "train"), read_lfwa(tmp_path, "test")
    assert train.keys == [names[0], names[2]] and test.keys == [names[1]]
    np.testing.assert_array_equal(train.targets[1], [1, 0] * 20)
    assert test.targets.sum() == 0
    assert train.images.load(1).size == (12, 10)
    with pytest.raises(ValueError, match="no images in split 'val'"):
        read_lfwa(tmp_path, "val")


# -- expressions ---------------------------------------------------------------------------------


def test_rafdb_labels_splits_and_aligned_names(tmp_path):
    rows = [("train_00001.jpg", 5), ("train_00002.jpg", 1), ("test_0001.jpg", 7), ("train_00003.jpg", 4)]
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("".join(f"{n} {y}\n" for n, y in rows))
    for n, _ in rows:
        write_image(tmp_path / "Image" / "aligned" / n.replace(".jpg", "_aligned.jpg"))
        write_image(tmp_path / "Image" / "original" / n, size=(20, 20))
    train = read_rafdb(tmp_path, "train")
    assert train.keys == ["train_00001.jpg", "train_00002.jpg", "train_00003.jpg"]
    assert [train.label_names[y] for y in train.targets] == ["Sadness", "Surprise", "Happiness"]
    assert train.counts() == {
        "Surprise": 1,
        "Fear": 0,
        "Disgust": 0,
        "Happiness": 1,
        "Sadness": 1,
        "Anger": 0,
        "Neutral": 0,
    }
    assert train.images.describe(0).endswith("Image/aligned/train_00001_aligned.jpg")
    test = read_rafdb(tmp_path, "test", images="original")
    assert [test.label_names[y] for y in test.targets] == ["Neutral"] and test.images.load(0).size == (20, 20)


def test_rafdb_malformed_label_names_line(tmp_path):
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 5\ntrain_00002.jpg 9\n")
    (tmp_path / "Image" / "aligned").mkdir(parents=True)
    with pytest.raises(
        MalformedFileError, match=r"list_patition_label.txt, line 2: .*expected '<train\|test>"
    ):
        read_rafdb(tmp_path, "train")


def test_fer2013_pixels_usage_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    faces = rng.integers(0, 256, size=(5, 48, 48))
    usage = ["Training", "PublicTest", "Training", "PrivateTest", "Training"]
    emotions = [3, 0, 6, 2, 3]
    with open(tmp_path / "fer2013.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        for e, face, u in zip(emotions, faces, usage, strict=True):
            writer.writerow([e, " ".join(map(str, face.ravel())), u])
    train = read_fer2013(tmp_path, "train")
    assert [train.label_names[y] for y in train.targets] == ["Happy", "Neutral", "Happy"]
    image = np.asarray(train.images.load(1))
    assert (
        image.shape == (48, 48, 3) and (image[..., 0] == faces[2]).all() and (image[..., 2] == faces[2]).all()
    )
    assert (
        len(read_fer2013(tmp_path, "val")) == 1 and len(read_fer2013(tmp_path / "fer2013.csv", "test")) == 1
    )
    with open(tmp_path / "fer2013.csv", "a") as f:
        f.write('1,"1 2 3",Training\n')
    with pytest.raises(MalformedFileError, match=r"fer2013.csv, line 7: 3 pixel values; expected 2304"):
        read_fer2013(tmp_path, "train")


def test_affectnet_drops_non_expressions_and_crops_the_face_box(tmp_path):
    lists, images = tmp_path / "Manually_Annotated_file_lists", tmp_path / "Manually_Annotated_Images"
    lists.mkdir()
    big = Image.new("RGB", (40, 30), (0, 0, 255))
    big.paste((255, 0, 0), (10, 5, 30, 25))  # the face: a red 20x20 box at (10, 5)
    (images / "1").mkdir(parents=True)
    big.save(images / "1" / "a.png")
    header = ",".join(
        [
            "subDirectory_filePath",
            "face_x",
            "face_y",
            "face_width",
            "face_height",
            "facial_landmarks",
            "expression",
            "valence",
            "arousal",
        ]
    )
    rows = [("1/a.png", 1), ("1/a.png", 9), ("1/a.png", 7), ("1/a.png", 10), ("1/a.png", 0)]
    body = "".join(f'{p},10,5,20,20,"1;2",{e},0.1,-0.2\n' for p, e in rows)
    (lists / "training.csv").write_text(header + "\n" + body)
    (lists / "validation.csv").write_text(header + "\n" + body[: body.index("\n") + 1])
    train = read_affectnet(tmp_path, "train")
    assert [train.label_names[y] for y in train.targets] == ["Happy", "Contempt", "Neutral"]
    assert train.skipped == 2 and len(read_affectnet(tmp_path, "test")) == 1
    face = np.asarray(train.images.load(0))
    assert face.shape == (20, 20, 3) and (face == [255, 0, 0]).all()
    seven = read_affectnet(tmp_path, "train", num_classes=7)
    assert len(seven) == 2 and seven.label_names[-1] == "Anger"
    (lists / "training.csv").write_text(header + "\n" + "1/a.png,10,5,20,20,x,happy,0,0\n")
    with pytest.raises(MalformedFileError, match=r"training.csv, line 2: .*expected integers"):
        read_affectnet(tmp_path, "train")


# -- generic layouts -----------------------------------------------------------------------------


def test_folder_classes_are_shared_across_splits(tmp_path):
    for split, cls, n in [
        ("train", "happy", 2),
        ("train", "sad", 1),
        ("test", "sad", 2),
        ("test", "angry", 1),
    ]:
        for i in range(n):
            write_image(tmp_path / split / cls / f"{i}.png")
    train, test = read_folder(tmp_path, "train"), read_folder(tmp_path, "test")
    assert train.label_names == test.label_names == ["angry", "happy", "sad"]
    assert train.counts() == {"angry": 0, "happy": 2, "sad": 1}
    assert test.counts() == {"angry": 1, "happy": 0, "sad": 2}
    assert test.keys[0] == "angry/0.png"
    flat = tmp_path / "flat"
    write_image(flat / "a" / "x.jpg")
    assert read_folder(flat, "test").counts() == {"a": 1}
    with pytest.raises(ValueError, match=r"no split 'train'; it has \['test'\]"):
        read_folder(flat, "train")


def test_csv_attributes_classes_split_column_and_captions(tmp_path):
    write_image(tmp_path / "img" / "a.png")
    write_image(tmp_path / "img" / "b.png")
    (tmp_path / "train.csv").write_text(
        "image,smiling,eyeglasses\nimg/a.png,1,-1\nimg/b.png,0,1\nimg/a.png,,true\n"
    )
    s = read_csv_labels(tmp_path, "train")
    assert s.task == "attributes" and s.label_names == ["smiling", "eyeglasses"]
    np.testing.assert_array_equal(s.targets, [[1, 0], [0, 1], [-1, 1]])
    assert s.images.load(0).size == (12, 10) and s.captions is None
    single = tmp_path / "labels.csv"
    single.write_text(
        "image,label,split,caption\nimg/a.png,sad,train,a sad face\nimg/b.png,happy,test,a happy face\n"
        "img/b.png,neutral,train,calm\n"
    )
    train, test = read_csv_labels(single, "train"), read_csv_labels(single, "test")
    assert train.label_names == test.label_names == ["happy", "neutral", "sad"]
    assert train.targets.tolist() == [2, 1] and test.targets.tolist() == [0]
    assert test.captions == ["a happy face"] and csv_splits(single) == ["train", "test"]
    ordered = read_csv_labels(single, "train", classes=["sad", "neutral", "happy"])
    assert ordered.targets.tolist() == [0, 1]
    (tmp_path / "test.csv").write_text("image,smiling,eyeglasses\nimg/a.png,1,maybe\n")
    with pytest.raises(MalformedFileError, match=r"test.csv, line 2: column 'eyeglasses' has value 'maybe'"):
        read_csv_labels(tmp_path, "test")


def test_labelled_shards_keep_captions_and_skip_unlabelled_samples(tmp_path):
    urls = write_caption_shards(tmp_path / "shards", count=12, per_shard=5)
    s = read_labelled_shards(urls, "test", ["red"], {"colour": ["blue", "green", "red", "yellow"]})
    assert len(s) == 12 and s.captions[0].startswith("a ") and s.captions[0].endswith(" square")
    colours = [s.questions["colour"][0][y] for y in s.questions["colour"][1]]
    assert [c.split()[1] for c in s.captions] == colours
    np.testing.assert_array_equal(s.targets[:, 0], [c == "red" for c in colours])
    bad = write_caption_shards(tmp_path / "nojson", count=3, per_shard=3, with_json=False)
    mixed = read_labelled_shards([*urls, *bad], "test", ["red"])
    assert len(mixed) == 12 and mixed.skipped == 3


def test_faceshapes_reader_follows_the_manifest(tmp_path):
    from flip.data.faceshapes import ensure_faceshapes

    ensure_faceshapes(tmp_path / "fs", {"train": 3, "val": 0, "test": 4}, image_size=32, num_workers=1)
    s = read_faceshapes(tmp_path / "fs", "test")
    assert len(s) == 4 and len(s.label_names) == 11 and set(s.questions) == {"hair_color", "expression"}
    keys = []
    for url in sorted((tmp_path / "fs" / "test").glob("*.tar")):
        import tarfile

        with tarfile.open(url) as tar:
            metas = [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
        keys += [m["key"] for m in metas]
        np.testing.assert_array_equal(s.targets[:, 0], [m["eyeglasses"] for m in metas])
    assert s.keys == keys
    with pytest.raises(FileNotFoundError, match="no FaceShapes dataset"):
        read_faceshapes(tmp_path / "missing", "test")
