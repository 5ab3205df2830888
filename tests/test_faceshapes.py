"""FaceShapes: attribute sampling, rendering effects, deterministic shards and manifest reuse."""

from __future__ import annotations

import collections
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from flip.data.faceshapes import (
    BINARY_ATTRIBUTES,
    MULTICLASS_ATTRIBUTES,
    FaceShapesManifest,
    ensure_faceshapes,
    render_face,
    sample_attributes,
)
from flip.data.faceshapes import generate as gen
from flip.data.faceshapes.render import (
    BASE_ZOOM,
    IDENTITY_POSE,
    LANDMARKS,
    PART_CLASSES,
    ZOOM_CENTER,
    render_face_parts,
)

SIZE = 112

# -- attributes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records() -> list[dict]:
    rng = random.Random(7)
    return [sample_attributes(rng) for _ in range(6000)]


def test_attribute_names_and_types(records: list[dict]) -> None:
    record = records[0]
    assert set(BINARY_ATTRIBUTES) | set(MULTICLASS_ATTRIBUTES) <= set(record)
    assert {"face_shape", "skin_tone", "background", "pose"} <= set(record)
    assert json.loads(json.dumps(record)) == record
    for r in records[:200]:
        assert all(isinstance(r[name], bool) for name in BINARY_ATTRIBUTES)
        assert r["expression"] in MULTICLASS_ATTRIBUTES["expression"]
        assert r["hair_color"] in (*MULTICLASS_ATTRIBUTES["hair_color"], None)


def test_sampling_is_deterministic() -> None:
    assert sample_attributes(random.Random(3)) == sample_attributes(random.Random(3))
    assert sample_attributes(random.Random(3)) != sample_attributes(random.Random(4))


def test_constraints_hold(records: list[dict]) -> None:
    for r in records:
        assert not (r["eyeglasses"] and r["sunglasses"])
        if r["bald"]:
            assert not (r["bangs"] or r["long_hair"] or r["hat"]) and r["hair_color"] is None
        else:
            assert r["hair_color"] is not None
        pose = r["pose"]
        assert -15 <= pose["angle"] <= 15 and 0.85 <= pose["scale"] <= 1.1
        assert abs(pose["dx"]) <= 0.06 and abs(pose["dy"]) <= 0.06


def test_marginals_leave_plenty_of_positives_and_negatives(records: list[dict]) -> None:
    for name in BINARY_ATTRIBUTES:
        rate = sum(r[name] for r in records) / len(records)
        assert 0.22 <= rate <= 0.5, (name, rate)
    for name, classes in MULTICLASS_ATTRIBUTES.items():
        counts = collections.Counter(r[name] for r in records if r[name] is not None)
        total = sum(counts.values())
        assert set(counts) == set(classes)
        assert all(0.12 < counts[c] / total < 0.28 for c in classes), counts
    assert len({r["face_shape"] for r in records}) == 3 and len({r["skin_tone"] for r in records}) >= 5


# -- rendering ------------------------------------------------------------------------------------


def _record(**overrides: object) -> dict:
    record: dict = dict.fromkeys(BINARY_ATTRIBUTES, False)
    record.update(
        hair_color="brown",
        expression="neutral",
        face_shape="oval",
        skin_tone="light",
        background={"kind": "solid", "color": [128, 128, 128]},
        pose=dict(IDENTITY_POSE),
        style={
            "glasses_shape": "round",
            "frame_color": [20, 20, 24],
            "hat_style": "fedora",
            "hat_color": [30, 70, 180],
            "earring_color": "gold",
            "facial_hair_color": "brown",
            "eye_color": "dark",
            "shirt_color": [60, 140, 90],
        },
    )
    record.update(overrides)
    return record


def _pixels(**overrides: object) -> np.ndarray:
    image = render_face(_record(**overrides), random.Random(0), size=SIZE)
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    return np.asarray(image, dtype=np.float32)


def _region(pixels: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Mean colour of the visible part of a box in the renderer's layout coordinates (frontal pose)."""

    def to_px(v: float, centre: float) -> int:  # clipped: the zoomed frame may cut the box
        return min(SIZE, max(0, round(((v - centre) * BASE_ZOOM + 0.5) * SIZE)))

    box = pixels[
        to_px(y0, ZOOM_CENTER[1]) : to_px(y1, ZOOM_CENTER[1]),
        to_px(x0, ZOOM_CENTER[0]) : to_px(x1, ZOOM_CENTER[0]),
    ]
    assert box.size, "empty region"
    return box.reshape(-1, 3).mean(axis=0)


def _luma(color: np.ndarray) -> float:
    return float(color @ np.array([0.299, 0.587, 0.114]))


def _redness(color: np.ndarray) -> float:
    return float(color[0] - (color[1] + color[2]) / 2)


EYES = (0.38, 0.47, 0.62, 0.52)


def test_render_is_deterministic_and_rng_only_adds_noise() -> None:
    record = sample_attributes(random.Random(11))
    a = np.asarray(render_face(record, random.Random(5)))
    b = np.asarray(render_face(record, random.Random(5)))
    c = np.asarray(render_face(record, random.Random(6)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a.astype(int) - c.astype(int)).mean() < 6
    assert render_face(record, random.Random(5), size=64).size == (64, 64)


def test_glasses_darken_the_eyes_sunglasses_most() -> None:
    plain = _luma(_region(_pixels(), *EYES))
    clear = _luma(_region(_pixels(eyeglasses=True), *EYES))
    dark = _luma(_region(_pixels(sunglasses=True), *EYES))
    assert dark < clear - 30 and dark < plain - 60
    assert clear < plain - 10


def test_hat_covers_the_top_of_the_head() -> None:
    top = (0.38, 0.14, 0.62, 0.28)
    without, with_hat = _region(_pixels(), *top), _region(_pixels(hat=True), *top)
    assert np.abs(with_hat - without).sum() > 90
    assert with_hat[2] > with_hat[0] + 50  # the hat is blue


def test_lipstick_reddens_the_mouth_and_blush_the_cheeks() -> None:
    mouth = (0.44, 0.645, 0.56, 0.69)
    assert _redness(_region(_pixels(lipstick=True), *mouth)) > _redness(_region(_pixels(), *mouth)) + 40
    cheek = (0.345, 0.555, 0.395, 0.595)
    assert _redness(_region(_pixels(rosy_cheeks=True), *cheek)) > _redness(_region(_pixels(), *cheek)) + 25


def test_facial_hair_darkens_chin_and_upper_lip() -> None:
    chin = (0.43, 0.73, 0.57, 0.78)
    assert _luma(_region(_pixels(beard=True), *chin)) < _luma(_region(_pixels(), *chin)) - 50
    lip = (0.46, 0.62, 0.54, 0.64)
    assert _luma(_region(_pixels(mustache=True), *lip)) < _luma(_region(_pixels(), *lip)) - 50


def test_hair_attributes_change_their_regions() -> None:
    crown = (0.42, 0.22, 0.58, 0.3)
    assert (
        _luma(_region(_pixels(bald=True, hair_color=None), *crown)) > _luma(_region(_pixels(), *crown)) + 60
    )
    forehead = (0.44, 0.36, 0.56, 0.4)
    assert _luma(_region(_pixels(bangs=True), *forehead)) < _luma(_region(_pixels(), *forehead)) - 60
    beside_neck = (0.21, 0.62, 0.26, 0.8)
    long, short = _region(_pixels(long_hair=True), *beside_neck), _region(_pixels(), *beside_neck)
    assert np.abs(long - short).sum() > 100
    blond = _region(_pixels(hair_color="blond"), *crown)
    assert _luma(blond) > _luma(_region(_pixels(), *crown)) + 60


def test_earrings_shine_at_the_ears() -> None:
    lobe = (0.255, 0.6, 0.295, 0.64)
    with_earrings, without = _region(_pixels(earrings=True), *lobe), _region(_pixels(), *lobe)

    def yellowness(c: np.ndarray) -> float:
        return float(c[0] + c[1] - 2 * c[2])

    assert yellowness(with_earrings) > yellowness(without) + 60


def test_expressions_are_distinct() -> None:
    face = (0.36, 0.4, 0.64, 0.72)
    renders = {e: _pixels(expression=e) for e in MULTICLASS_ATTRIBUTES["expression"]}
    names = list(renders)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = np.abs(renders[a] - renders[b]).mean(axis=2)
            x0, y0 = (
                round(((v - c) * BASE_ZOOM + 0.5) * SIZE) for v, c in zip(face[:2], ZOOM_CENTER, strict=True)
            )
            x1, y1 = (
                round(((v - c) * BASE_ZOOM + 0.5) * SIZE) for v, c in zip(face[2:], ZOOM_CENTER, strict=True)
            )
            changed = (diff[y0:y1, x0:x1] > 40).sum()
            assert changed > 25, (a, b, changed)
    # surprised opens the mouth: darker centre than the closed neutral one
    centre = (0.48, 0.66, 0.52, 0.69)
    assert _luma(_region(renders["surprised"], *centre)) < _luma(_region(renders["neutral"], *centre)) - 40


def test_pose_moves_and_turns_the_face() -> None:
    still = _pixels()
    shifted = _pixels(pose={"angle": 0.0, "scale": 1.0, "dx": 0.06, "dy": 0.0})
    turned = _pixels(pose={"angle": 15.0, "scale": 1.0, "dx": 0.0, "dy": 0.0})
    assert np.abs(still - shifted).mean() > 5 and np.abs(still - turned).mean() > 5


# -- shards ---------------------------------------------------------------------------------------

SPLITS = {"train": 40, "val": 8, "test": 12}


def _shard_bytes(manifest: FaceShapesManifest) -> dict[str, bytes]:
    return {rel: (manifest.root / rel).read_bytes() for rels in manifest.shards.values() for rel in rels}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> FaceShapesManifest:
    root = tmp_path_factory.mktemp("fs") / "faceshapes"
    return ensure_faceshapes(root, SPLITS, samples_per_shard=16, image_size=64, seed=3, num_workers=0)


def test_make_sample_is_deterministic() -> None:
    a, b = (
        gen.make_sample("train", 5, seed=1, image_size=48),
        gen.make_sample("train", 5, seed=1, image_size=48),
    )
    assert a == b
    other = gen.make_sample("train", 5, seed=2, image_size=48)
    assert other["jpg"] != a["jpg"] and other["json"] != a["json"]
    assert gen.make_sample("val", 5, seed=1, image_size=48)["jpg"] != a["jpg"]


def test_layout_and_manifest(dataset: FaceShapesManifest) -> None:
    root = dataset.root
    assert dataset.splits == SPLITS
    assert dataset.shards["train"] == [f"train/train-{i:05d}.tar" for i in range(3)]
    assert dataset.urls("test") == [str(root / "test" / "test-00000.tar")]
    assert all(Path(u).is_absolute() and Path(u).is_file() for u in dataset.urls("train"))
    on_disk = json.loads((root / "manifest.json").read_text())
    assert on_disk["version"] == gen.VERSION and on_disk["fingerprint"] == dataset.fingerprint
    assert not list(root.parent.glob(".faceshapes.tmp-*"))
    with pytest.raises(KeyError, match="no split 'dev'"):
        dataset.urls("dev")


def test_round_trip_through_webdataset(dataset: FaceShapesManifest) -> None:
    keys = []
    for split, count in SPLITS.items():
        samples = list(wds.WebDataset(dataset.urls(split), shardshuffle=False))
        assert len(samples) == count
        for i, sample in enumerate(samples):
            assert sample["__key__"] == f"{split}_{i:06d}"
            record = json.loads(sample["json"])
            caption = sample["txt"].decode("utf-8")
            assert record["caption"] == caption and 3 <= len(caption.split()) <= 36
            assert record["key"] == sample["__key__"] and record["split"] == split
            for name, value in record["mentions"]:
                assert record[name] == value
            image = Image.open(io.BytesIO(sample["jpg"]))
            assert image.format == "JPEG" and image.size == (64, 64) and image.mode == "RGB"
            keys.append(sample["__key__"])
    assert len(keys) == len(set(keys))


def test_output_does_not_depend_on_workers_or_sharding(dataset: FaceShapesManifest, tmp_path: Path) -> None:
    parallel = ensure_faceshapes(
        tmp_path / "p", SPLITS, samples_per_shard=16, image_size=64, seed=3, num_workers=2
    )
    assert _shard_bytes(parallel) == _shard_bytes(dataset)
    regrouped = ensure_faceshapes(
        tmp_path / "r", SPLITS, samples_per_shard=7, image_size=64, seed=3, num_workers=0
    )
    first = next(iter(wds.WebDataset(regrouped.urls("test"), shardshuffle=False)))
    reference = next(iter(wds.WebDataset(dataset.urls("test"), shardshuffle=False)))
    assert first["jpg"] == reference["jpg"] and first["txt"] == reference["txt"]


def test_reuse_and_regeneration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "faceshapes"
    args = {"splits": {"train": 10, "test": 5}, "samples_per_shard": 8, "image_size": 48, "seed": 0}
    first = ensure_faceshapes(root, **args, num_workers=0)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}

    def must_not_run(task: tuple) -> int:
        raise AssertionError("regenerated an up-to-date dataset")

    monkeypatch.setattr(gen, "_write_shard", must_not_run)
    again = ensure_faceshapes(root, **args, num_workers=2)  # workers do not change the output
    assert again.fingerprint == first.fingerprint and again.shards == first.shards
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    monkeypatch.undo()

    old_bytes = _shard_bytes(first)
    changed = ensure_faceshapes(root, **{**args, "seed": 1}, num_workers=0)
    assert changed.fingerprint != first.fingerprint
    assert _shard_bytes(changed) != old_bytes
    assert json.loads((root / "manifest.json").read_text())["params"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["faceshapes"]


def test_a_failed_run_leaves_the_previous_dataset_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "faceshapes"
    args = {"splits": {"train": 6}, "samples_per_shard": 4, "image_size": 32}
    good = ensure_faceshapes(root, **args, seed=0, num_workers=0)
    before = _shard_bytes(good)
    calls, write_shard = [], gen._write_shard

    def dies_midway(task: tuple) -> int:
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the run were killed
        return write_shard(task)

    monkeypatch.setattr(gen, "_write_shard", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ensure_faceshapes(root, **args, seed=1, num_workers=0)
    assert _shard_bytes(FaceShapesManifest.load(root)) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    missing = root / good.shards["train"][0]
    missing.unlink()  # a damaged dataset is regenerated, not trusted
    assert ensure_faceshapes(root, **args, seed=0, num_workers=0).urls("train")
    assert _shard_bytes(FaceShapesManifest.load(root)) == before


def test_invalid_parameters_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split name 'a/b'"):
        ensure_faceshapes(tmp_path / "x", {"a/b": 3})
    with pytest.raises(ValueError, match="split 'train' has -1 samples"):
        ensure_faceshapes(tmp_path / "x", {"train": -1})
    with pytest.raises(ValueError, match="samples_per_shard=0"):
        ensure_faceshapes(tmp_path / "x", {"train": 1}, samples_per_shard=0)
    assert not (tmp_path / "x").exists()


def test_cli_writes_shards_and_a_contact_sheet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, sheet = tmp_path / "fs", tmp_path / "sheet.png"
    gen.main(
        [
            "--root",
            str(root),
            "--train",
            "3",
            "--val",
            "0",
            "--test",
            "6",
            "--image-size",
            "48",
            "--workers",
            "0",
            "--preview",
            str(sheet),
            "--preview-count",
            "4",
        ]
    )
    assert "test: 6 in 1 shards" in capsys.readouterr().out
    assert FaceShapesManifest.load(root).splits == {"train": 3, "val": 0, "test": 6}
    with Image.open(sheet) as image:
        assert image.size[0] == 8 * 224
    lines = sheet.with_suffix(".txt").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("0\ttest_000000\t")


def test_parts_are_opt_in_and_change_no_byte_of_the_dataset_without_them(tmp_path: Path) -> None:
    splits = {"train": 3, "test": 2}
    plain = ensure_faceshapes(tmp_path / "plain", splits, samples_per_shard=4, image_size=48, num_workers=0)
    # the fingerprint FLIP computed for these settings before parts existed: no regeneration
    assert plain.fingerprint == "fa488fe0343e8cd7" and "parts" not in plain.params
    sizes = ["--train", "3", "--val", "0", "--test", "2", "--image-size", "48", "--samples-per-shard", "4"]
    gen.main(["--root", str(tmp_path / "parts"), *sizes, "--workers", "0", "--parts"])
    parts = FaceShapesManifest.load(tmp_path / "parts")
    assert parts.params["parts"] is True and parts.fingerprint != plain.fingerprint
    wanted = {"jpg", "txt", "json", gen.PARTS_MEMBER}
    for split in splits:
        for (key, a), (_, b) in zip(
            (s for url in plain.urls(split) for s in gen.iter_tar_samples(url, wanted=wanted)),
            (s for url in parts.urls(split) for s in gen.iter_tar_samples(url, wanted=wanted)),
            strict=True,
        ):
            assert a["jpg"] == b["jpg"] and a["txt"] == b["txt"], key  # the same image, byte for byte
            record = json.loads(b["json"])
            assert set(record.pop("landmarks")) == set(LANDMARKS) and record == json.loads(a["json"])
            mask = np.asarray(Image.open(io.BytesIO(b[gen.PARTS_MEMBER])))
            assert gen.PARTS_MEMBER not in a and mask.shape == (48, 48) and mask.max() < len(PART_CLASSES)


def test_part_masks_and_landmarks_follow_the_drawing() -> None:
    record = _record(pose={"angle": 12.0, "scale": 0.95, "dx": 0.03, "dy": -0.02})
    rendered = render_face_parts(record, random.Random(0), size=SIZE)
    assert np.array_equal(
        np.asarray(rendered.image), np.asarray(render_face(record, random.Random(0), size=SIZE))
    )
    mask, points = rendered.mask, rendered.points
    at = {name: PART_CLASSES[mask[int(y), int(x)]] for name, (x, y) in points.items()}
    assert at["left_eye"] == at["right_eye"] == "eye" and at["chin"] in ("skin", "neck")
    assert (
        points["left_eye"][0] < points["right_eye"][0] and points["mouth_left"][0] < points["mouth_right"][0]
    )
    assert {PART_CLASSES[c] for c in np.unique(mask)} >= {"background", "skin", "hair", "eye", "brow", "nose"}
    hat = render_face_parts(_record(hat=True), random.Random(0), size=SIZE).mask
    assert (hat == PART_CLASSES.index("hat")).sum() > 200 and "hat" not in {
        PART_CLASSES[c] for c in np.unique(mask)
    }
