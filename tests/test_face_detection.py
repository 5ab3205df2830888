"""Face detection for flip-data: MTCNN finds faces where they are known to be, batches give what
single images give, and the several-faces policy writes and counts what it says it does."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from flip.cli.data import main
from flip.prepare.detect import MtcnnFaceDetector
from flip.prepare.faces import Face, FacePolicy, select_faces

from .helpers import read_shards
from .helpers.faces import ASTRONAUT_EYES_256, astronaut, faceshapes_eyes, faceshapes_face

POSES = [(0.0, 0.6, 0.0, 0.0), (15.0, 0.5, 0.1, -0.05), (-20.0, 0.7, 0.0, 0.03), (8.0, 0.45, -0.12, 0.08)]


@pytest.fixture(scope="module")
def mtcnn() -> MtcnnFaceDetector:
    detector = MtcnnFaceDetector(threads=None)  # the suite's one thread (conftest) stays as it is
    detector.load()
    return detector


@pytest.mark.parametrize("pose", POSES, ids=[f"angle{p[0]:+.0f}_scale{p[1]}" for p in POSES])
def test_mtcnn_puts_the_eyes_where_the_renderer_drew_them(mtcnn, pose):
    (face,) = mtcnn.detect(faceshapes_face(*pose))
    eyes = np.asarray(face.landmarks)[:2]
    np.testing.assert_allclose(eyes, faceshapes_eyes(*pose), atol=2.5)
    x0, y0, x1, y1 = face.box
    assert all(x0 < x < x1 and y0 < y < y1 for x, y in np.asarray(face.landmarks))
    assert face.score > 0.9


def test_the_astronaut_is_found_with_her_landmarks_on_her_face(mtcnn):
    faces = mtcnn.detect(astronaut(256))
    assert len(faces) == 1 and faces[0].score > 0.99
    marks = np.asarray(faces[0].landmarks)
    np.testing.assert_allclose(marks[:2], ASTRONAUT_EYES_256, atol=4.0)  # read off the photo by hand
    nose, mouth = marks[2], marks[3:]
    assert marks[:2, 1].max() < nose[1] < mouth[:, 1].min()  # eyes above the nose above the mouth
    assert mouth[0, 0] < nose[0] < mouth[1, 0]


def test_landmarks_follow_a_known_similarity_transform_of_a_real_face(mtcnn):
    """The astronaut turned by 25 degrees, shrunk to 0.6 and moved: her landmarks must move with her."""
    photo = astronaut(256)
    reference = np.asarray(mtcnn.detect(photo)[0].landmarks)
    angle, scale, shift = np.radians(25.0), 0.6, np.array([40.0, -10.0])
    a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    inverse = np.linalg.inv(a)  # PIL's affine maps output pixels back to input pixels
    offset = -inverse @ shift
    moved = photo.transform(
        (256, 256), Image.Transform.AFFINE, (*inverse[0], offset[0], *inverse[1], offset[1]), Image.BILINEAR
    )
    (face,) = mtcnn.detect(moved)
    np.testing.assert_allclose(np.asarray(face.landmarks), reference @ a.T + shift, atol=3.0)


def test_a_batch_finds_what_single_images_find(mtcnn):
    images = [faceshapes_face(*pose) for pose in POSES[:3]] + [faceshapes_face(*POSES[3], size=128)]
    batched = MtcnnFaceDetector(batch_size=2, threads=None).detect_batch(images)
    assert len(batched) == 4
    for image, faces in zip(images, batched, strict=True):
        alone = mtcnn.detect(image)
        assert len(faces) == len(alone) == 1
        np.testing.assert_allclose(faces[0].box, alone[0].box, atol=1e-2)
        np.testing.assert_allclose(faces[0].landmarks, alone[0].landmarks, atol=1e-2)


def test_large_images_are_detected_scaled_and_answered_in_their_own_pixels(mtcnn):
    image = faceshapes_face(*POSES[1], size=320)
    (face,) = MtcnnFaceDetector(max_side=160, threads=None).detect(image)
    np.testing.assert_allclose(np.asarray(face.landmarks)[:2], faceshapes_eyes(*POSES[1], size=320), atol=5.0)


def test_lfw_subset_faces_found_and_non_faces_not(mtcnn):
    """skimage's lfw_subset: 100 real 25 x 25 face crops, then 100 crops of no face. docs/data.md
    states these counts."""
    from skimage import data

    crops = [Image.fromarray(np.uint8(np.rint(x * 255))).convert("RGB") for x in data.lfw_subset()]
    found = mtcnn.detect_batch(crops)
    confident = [any(f.score >= 0.98 for f in faces) for faces in found]
    assert sum(confident[:100]) == 99 and sum(bool(faces) for faces in found[:100]) == 100
    assert sum(bool(faces) for faces in found[100:]) == 0


def _face(x0, y0, side, score=0.999):
    return Face((x0, y0, x0 + side, y0 + side), score, None)


def test_the_policy_keeps_the_largest_confident_face_and_counts_the_others():
    faces = [_face(0, 0, 150), _face(200, 0, 300, score=0.9), _face(500, 0, 200), _face(800, 0, 100)]
    largest = select_faces(faces, FacePolicy(min_confidence=0.98, min_size=128))
    assert largest.kept == [faces[2]]  # the 300 px face is not confident enough
    assert largest.rejected == Counter(low_confidence=1, not_largest=1, small_face=1)
    every = select_faces(faces, FacePolicy(min_confidence=0.98, min_size=128, keep="all"))
    assert every.kept == [faces[2], faces[0]]  # largest first
    assert every.rejected == Counter(low_confidence=1, small_face=1)
    assert select_faces([], FacePolicy()).skip_reason == "no_face"
    assert select_faces(faces[1:2], FacePolicy()).skip_reason == "low_confidence"
    assert select_faces(faces[3:], FacePolicy()).skip_reason == "small_face"
    haar = Face((0, 0, 200, 200))  # the Haar cascade gives no confidence: only the size counts
    assert select_faces([haar], FacePolicy()).kept == [haar]


@pytest.mark.parametrize("bad", [{"min_confidence": 1.5}, {"min_size": -1}, {"keep": "first"}])
def test_a_bad_policy_is_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match=str(next(iter(bad.values())))):
        FacePolicy(**bad)


def _two_people(tmp_path):
    """A 320 x 160 photo of two FaceShapes faces, a large one on the right and a smaller on the left."""
    images = tmp_path / "photos"
    images.mkdir()
    photo = Image.new("RGB", (320, 160), (128, 128, 128))
    photo.paste(faceshapes_face(0.0, 0.5, 0.0, 0.0, size=120), (10, 20))
    photo.paste(faceshapes_face(0.0, 0.6, 0.0, 0.0, size=160), (160, 0))
    photo.save(images / "pair.png")
    Image.new("RGB", (160, 120), (90, 120, 90)).save(images / "wall.png")
    (images / "metadata.csv").write_text("file_name,caption\npair.png,two people\nwall.png,a wall\n")
    return images


def test_several_faces_largest_or_all_through_the_command(tmp_path, capsys):
    images = _two_people(tmp_path)
    common = ["--detect-faces", "--min-face-size", "30", "--workers", "1", "--no-progress"]
    assert main(["folder", str(images), "-o", str(tmp_path / "one"), *common]) == 0
    assert main(["folder", str(images), "-o", str(tmp_path / "all"), "--faces", "all", *common]) == 0
    one, every = read_shards(tmp_path / "one"), read_shards(tmp_path / "all")
    assert sorted(one) == ["pair"] and sorted(every) == ["pair_face0", "pair_face1"]
    boxes = {key: json.loads(sample["json"])["face"]["box"] for key, sample in every.items()}
    assert boxes["pair_face0"][0] > 160 > boxes["pair_face1"][2]  # the large face (right) is face 0
    record = json.loads(one["pair"]["json"])
    assert record["face"]["box"] == boxes["pair_face0"] and record["face"]["faces_written"] == 1
    assert len(record["face"]["landmarks"]) == 5 and record["face"]["confidence"] > 0.98
    left, top, right, bottom = record["crop"]
    x0, y0, x1, y1 = record["face"]["box"]
    assert left <= x0 and right >= x1 and top <= y0 and bottom >= y1
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "all")]
    assert reports[0]["faces"] == {"detected": 2, "selected": 1, "rejected": {"not_largest": 1}}
    assert reports[1]["faces"] == {"detected": 2, "selected": 2, "rejected": {}}
    assert reports[0]["skipped_by_reason"] == reports[1]["skipped_by_reason"] == {"no_face": 1}
    assert reports[0]["settings"]["detector"]["name"] == "mtcnn"


def test_faces_under_the_minimum_size_are_skipped_and_counted(tmp_path, capsys):
    """The detector searches from half --min-face-size up; what it finds under the minimum is counted."""
    images = _two_people(tmp_path)  # faces of about 35 and 56 px
    with pytest.raises(SystemExit) as exit_info:  # no sample written: exit 1, naming the reasons
        main(["folder", str(images), "-o", str(tmp_path / "out"), "--detect-faces", "--min-face-size", "80"])
    assert exit_info.value.code == 1 and "small_face 1" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["skipped_by_reason"] == {"no_face": 1, "small_face": 1}
    assert report["faces"] == {"detected": 2, "selected": 0, "rejected": {"small_face": 2}}
    assert report["settings"]["detector"]["min_face_size"] == 40


def test_the_defaults_are_facecaption_15m_s(tmp_path, capsys):
    images = _two_people(tmp_path)
    with pytest.raises(SystemExit):  # FaceCaption-15M keeps faces over 128 px: none here
        main(["folder", str(images), "-o", str(tmp_path / "out"), "--detect-faces", "--no-progress"])
    settings = json.loads((tmp_path / "out" / "report.json").read_text())["settings"]
    assert settings["faces"] == {"min_confidence": 0.98, "min_size": 128, "keep": "largest"}
    assert settings["detector"]["name"] == "mtcnn" and settings["detector"]["min_face_size"] == 64


def test_forked_workers_detect_what_one_process_detects(tmp_path, capsys):
    images = _two_people(tmp_path)
    flags = ["--detect-faces", "--faces", "all", "--min-face-size", "30", "--samples-per-shard", "1"]
    for workers in ("1", "2"):
        assert main(["folder", str(images), "-o", str(tmp_path / workers), "--workers", workers, *flags]) == 0
    shards = sorted(p.name for p in (tmp_path / "1").glob("*.tar"))
    assert shards == ["00000.tar", "00001.tar"]
    for name in shards:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()


def test_a_device_torch_does_not_know_is_refused_before_any_output(tmp_path, capsys):
    images = _two_people(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["folder", str(images), "-o", str(tmp_path / "out"), "--detect-faces", "--detect-device", "gpu0"]
        )
    assert exit_info.value.code == 2 and "'gpu0' is no torch device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
