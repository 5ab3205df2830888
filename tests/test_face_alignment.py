"""Face alignment: five landmarks land on the ArcFace template, in flip-data's shards and in the
images a benchmark hands to evaluation (`benchmark.align`)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from flip.cli.data import main
from flip.evaluation.aligned import AlignedImages, align_config
from flip.evaluation.benchmark import Benchmark
from flip.prepare.align import ARCFACE_112, AlignConfig, align_face, estimate_similarity, template
from flip.prepare.detect import MtcnnFaceDetector

from .helpers import compose_eval, eval_overrides, read_shards, run_zeroshot
from .helpers.faces import faceshapes_eyes, faceshapes_face


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.radians(angle_deg)
    m = np.eye(3)
    m[:2, :2] = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m[:2, 2] = shift
    return m


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def _blobs(points: np.ndarray, size: tuple[int, int], sigma: float) -> Image.Image:
    """Gaussian blobs centred on `points` (pixel centres at integer coordinates), one channel."""
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]]
    canvas = sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)) for x, y in points)
    return Image.fromarray(np.uint8(np.clip(canvas, 0, 1) * 255)).convert("RGB")


def _centroids(image: Image.Image, near: np.ndarray, radius: float) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float64)[..., 0]
    ys, xs = np.mgrid[0 : pixels.shape[0], 0 : pixels.shape[1]]
    out = []
    for x, y in near:
        w = pixels * (((xs - x) ** 2 + (ys - y) ** 2) < radius**2)
        out.append([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])
    return np.array(out)


@pytest.mark.parametrize(
    ("angle", "scale", "shift", "config"),
    [
        (30.0, 1.6, (150.0, 40.0), AlignConfig(224, 0.0)),
        (-12.0, 0.8, (20.0, 60.0), AlignConfig(112, 0.25)),
        (5.0, 9.0, (100.0, 80.0), AlignConfig(160, 0.1)),  # shrunk > 2x: box-reduced before the warp
    ],
)
def test_known_landmarks_land_on_the_template(angle, scale, shift, config):
    """Landmarks made by a known similarity T from the 112 px template: the fitted matrix is the
    template's scaling composed with T's inverse, and the warped image shows them on the template."""
    t = _similarity(angle, scale, shift)
    landmarks = _apply(t, ARCFACE_112)
    side = int(np.ceil(landmarks.max() + 12 * scale))
    image = _blobs(landmarks, (side, side), sigma=2.0 * scale)
    k = config.size / 112 / (1 + 2 * config.padding)  # template pixels -> output pixels
    offset = config.padding * config.size / (1 + 2 * config.padding)
    to_output = np.array([[k, 0, offset], [0, k, offset], [0, 0, 1]])
    expected = to_output @ np.linalg.inv(t)

    aligned = align_face(image, landmarks, config)
    np.testing.assert_allclose(aligned.matrix, expected[:2], atol=1e-6 * max(1, abs(expected).max()))
    np.testing.assert_allclose(aligned.landmarks, template(config), atol=1e-6)
    assert aligned.image.size == (config.size, config.size)
    found = _centroids(aligned.image, template(config), radius=3.0 * 2.0 * k)
    np.testing.assert_allclose(found, template(config), atol=0.6)


def test_landmarks_that_fit_no_transform_are_refused():
    with pytest.raises(ValueError, match="no similarity transform"):
        estimate_similarity(np.full((5, 2), 7.0), template(AlignConfig()))
    with pytest.raises(ValueError, match="5 finite"):
        estimate_similarity(np.zeros((4, 2)), template(AlignConfig()))
    with pytest.raises(ValueError, match=r"padding=0\.6"):
        AlignConfig(padding=0.6)


POSES = [(0.0, 0.6, 0.0, 0.0), (18.0, 0.5, 0.08, -0.04), (-25.0, 0.65, -0.05, 0.02)]


def test_flip_data_aligns_detected_faces_onto_the_template(tmp_path, capsys):
    """FaceShapes faces at known poses: the matrix each sample records takes the eyes the renderer
    drew to the template's eyes to a few pixels (of a 112 px crop with eyes 35 px apart: the
    five-point fit spreads over all points that a cartoon's nose and mouth are not where a
    human's are), and to where the .json says the detected eyes landed."""
    images = tmp_path / "photos"
    images.mkdir()
    rows = ["file_name,caption"]
    for i, pose in enumerate(POSES):
        faceshapes_face(*pose).save(images / f"face{i}.png")
        rows.append(f"face{i}.png,a face")
    (images / "metadata.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "aligned"
    flags = ["--detect-faces", "--align", "--align-size", "112", "--min-face-size", "30", "--no-progress"]
    assert main(["folder", str(images), "-o", str(out), "--workers", "1", *flags]) == 0
    samples = read_shards(out)
    assert sorted(samples) == ["face0", "face1", "face2"]
    eyes_on_template = template(AlignConfig(112))[:2]
    for i, pose in enumerate(POSES):
        record = json.loads(samples[f"face{i}"]["json"])
        matrix = np.vstack([record["align"]["matrix"], [0, 0, 1]])
        true_eyes = _apply(matrix, faceshapes_eyes(*pose))
        np.testing.assert_allclose(true_eyes, eyes_on_template, atol=4.5)
        np.testing.assert_allclose(true_eyes, np.array(record["align"]["landmarks"])[:2], atol=3.0)
        landmarks = np.array(record["face"]["landmarks"])
        np.testing.assert_allclose(record["align"]["landmarks"], _apply(matrix, landmarks), atol=0.02)
        assert record["align"]["template"] == "arcface_112" and record["align"]["size"] == 112
        assert (record["width"], record["height"]) == (112, 112) and "crop" not in record
        assert Image.open(io.BytesIO(samples[f"face{i}"]["jpg"])).size == (112, 112)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["align"] == {"template": "arcface_112", "size": 112, "padding": 0.0}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--align"], "--align needs landmarks"),
        (["--align", "--detect-faces", "--detector", "haar"], "five landmarks"),
        (["--align", "--detect-faces", "--resize-short-side", "100"], "drop --resize-short-side"),
    ],
)
def test_align_without_landmarks_is_refused_before_any_output(tmp_path, capsys, flags, message):
    images = tmp_path / "photos"
    images.mkdir()
    faceshapes_face(*POSES[0]).save(images / "a.png")
    (images / "metadata.csv").write_text("file_name,caption\na.png,a face\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["folder", str(images), "-o", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def face_benchmark(tmp_path):
    """A class-per-folder benchmark of FaceShapes faces at known poses, and one image of no face."""
    root = tmp_path / "faces"
    for i, pose in enumerate(POSES):
        path = root / "test" / ("tilted" if pose[0] else "upright") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        faceshapes_face(*pose).save(path)
    Image.new("RGB", (100, 90), (90, 120, 90)).save(root / "test" / "upright" / "wall.png")
    return root


def test_benchmark_align_hands_evaluation_aligned_faces(tmp_path, face_benchmark, tiny_ckpt):
    overrides = eval_overrides(tmp_path, tiny_ckpt, "folder", face_benchmark)
    cfg = compose_eval("eval_zeroshot", tmp_path, *overrides, "benchmark.align={size:112,padding:0.1}")
    split = Benchmark.from_config(cfg.benchmark).load("test")
    assert isinstance(split.images, AlignedImages) and split.images.config == AlignConfig(112, 0.1)
    mtcnn = MtcnnFaceDetector(threads=None)
    for i, key in enumerate(split.keys):
        image = split.images.load(i)
        original = Image.open(split.images.images.describe(i)).convert("RGB")
        if key.endswith("wall.png"):  # no face: evaluated as it is
            assert np.array_equal(np.asarray(image), np.asarray(original))
            continue
        (face,) = mtcnn.detect(original)  # flip-data's aligner on flip-data's detector's landmarks
        expected = align_face(original, np.asarray(face.landmarks), AlignConfig(112, 0.1)).image
        assert image.size == (112, 112) and np.array_equal(np.asarray(image), np.asarray(expected))
    plain = Benchmark.from_config(compose_eval("eval_zeroshot", tmp_path, *overrides).benchmark)
    unaligned = plain.load("test").images
    assert not isinstance(unaligned, AlignedImages)
    fingerprints = {unaligned.fingerprint(), split.images.fingerprint()}
    fingerprints.add(AlignedImages(unaligned, AlignConfig(112, 0.0)).fingerprint())
    assert len(fingerprints) == 3  # cached features of one never serve another
    assert split.images.subset([1]).load(0).size == (112, 112)

    metrics = run_zeroshot(compose_eval("eval_zeroshot", tmp_path, *overrides, "benchmark.align=true"))
    assert metrics["n_test"] == 4


@pytest.mark.parametrize("value", ["yes", 3, {"size": 112, "margin": 0.1}])
def test_a_bad_benchmark_align_value_is_refused(value):
    with pytest.raises(ValueError, match=r"benchmark\.align"):
        align_config(value)
