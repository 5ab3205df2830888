"""`flip-data curate` end to end: planted duplicates and junk captions are removed and nothing else,
the agreement filter keeps matching pairs over shuffled ones with a trained demo model, balancing
caps every entry, a killed run resumes, the reports hold what the filters decided, and a run split into
parts (`--num-parts N --part K`) scans every shard once and writes what one machine writes."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import imagehash
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from flip.cli.data import main
from flip.data.shards import iter_tar_samples, write_shard
from flip.locking import hold_lock
from flip.prepare.parts import part_of

from .helpers import compose_train_config, read_shards

STEPS = 100  # the demo's tiny towers: enough for matching captions to outscore shuffled ones


@pytest.fixture(scope="module")
def faces() -> list[tuple[str, dict[str, bytes]]]:
    """96 FaceShapes training faces at the demo's test size (48 px), as (key, members)."""
    from flip.data.faceshapes.generate import make_sample

    samples = [make_sample("train", i, seed=0, image_size=48) for i in range(96)]
    return [(s.pop("__key__"), s) for s in samples]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[tuple[str, dict[str, bytes]]]]:
    """The demo's tiny model trained for STEPS on its 96 FaceShapes training faces, without
    evaluation (a few seconds), and those faces. The session's `trained_demo` stops after 4 steps,
    where matching and shuffled captions still score alike. Captions only (the CLIP + FILIP
    losses): the demo's statements pull faces that state the same attributes together within
    these steps, and the duplicates test needs the model to keep distinct faces apart."""
    from flip.training.run import train

    root = tmp_path_factory.mktemp("curate_demo")
    overrides = [
        f"trainer.max_steps={STEPS}",
        "evaluate=false",
        "trainer.val_check_interval=null",
        "loss=clip_filip",
    ]
    train(compose_train_config(root, [*overrides, "callbacks.model_checkpoint.every_n_train_steps=1000"]))
    shards = sorted((root / "data/faceshapes/train").glob("*.tar"))
    return root / "run/checkpoints/last.ckpt", [s for tar in shards for s in iter_tar_samples(str(tar))]


def _write(folder: Path, samples: list[dict], per_shard: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(samples), per_shard):
        write_shard(folder / f"{start // per_shard:05d}.tar", samples[start : start + per_shard])
    return folder


def _sample(key: str, fields: dict[str, bytes], caption: str | None = None, **images: bytes) -> dict:
    return {
        "__key__": key,
        **(images or {"jpg": fields["jpg"]}),
        "txt": (caption if caption is not None else fields["txt"].decode()).encode(),
        "json": fields["json"],
    }


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _curate(*args, workers: int = 1) -> None:
    assert main(["curate", *map(str, args), "--workers", str(workers), "--no-progress"]) == 0


def _removed(out: Path) -> dict[str, tuple[str, str]]:
    lines = (out / "curation_removed.jsonl").read_text().splitlines()
    return {r["key"]: (r["reason"], r["detail"]) for r in map(json.loads, lines)}


def _planted(faces) -> tuple[list[dict], dict[str, str]]:
    """The 96 faces, then copies of some and junk captions on others: (samples, planted key -> reason)."""
    image = {i: Image.open(io.BytesIO(faces[i][1]["jpg"])).convert("RGB") for i in (3, 5, 7, 9, 11)}
    samples = [_sample(key, fields) for key, fields in faces[:90]]
    copies = [
        (_sample("png_copy", faces[3][1], png=_encode(image[3], "PNG")), "exact_duplicate"),  # same pixels
        (_sample("byte_copy", faces[5][1], "another caption for the same picture"), "exact_duplicate"),
        (_sample("jpeg_q60", faces[7][1], jpg=_encode(image[7], "JPEG", quality=60)), "near_duplicate"),
        (_sample("resized", faces[9][1], jpg=_encode(image[9].resize((40, 40)), "JPEG")), "near_duplicate"),
        (
            _sample(
                "brighter", faces[11][1], jpg=_encode(ImageEnhance.Brightness(image[11]).enhance(1.1), "JPEG")
            ),
            "near_duplicate",
        ),
    ]
    junk = ["see www.example.com for more faces", "a face", "1234 5678 90 11 12", "sooooooo cute face"]
    reasons = ["caption_url", "caption_too_short", "caption_few_letters", "caption_repeats"]
    for (key, fields), caption, reason in zip(faces[90:94], junk, reasons, strict=True):
        copies.append((_sample(key, fields, caption), reason))
    samples[40:40] = [s for s, _ in copies[:2]]  # copies come after their originals, across shards
    samples += [s for s, _ in copies[2:]] + [_sample(k, f) for k, f in faces[94:]]
    return samples, {s["__key__"]: reason for s, reason in copies}


def test_planted_duplicates_and_junk_captions_are_removed_and_nothing_else(faces, tmp_path):
    samples, planted = _planted(faces)
    inputs = _write(tmp_path / "in", samples, per_shard=30)
    out = tmp_path / "out"
    _curate(inputs, "-o", out, "--min-words", 3, "--samples-per-shard", 40)

    written = read_shards(out)
    originals = {key: fields for key, fields in faces}
    junk = {key for key in planted if key in originals}  # faces given a junk caption
    assert set(written) == set(originals) - junk  # every other face once; no copy
    for key, members in written.items():  # copied byte for byte, with the input's fields and a phash
        assert members["jpg"] == originals[key]["jpg"] and members["txt"] == originals[key]["txt"]
        meta, given = json.loads(members["json"]), json.loads(originals[key]["json"])
        assert {k: meta[k] for k in given if k not in ("source", "key", "caption")} == {
            k: v for k, v in given.items() if k not in ("source", "key", "caption")
        }
        assert meta["phash"] == str(imagehash.phash(Image.open(io.BytesIO(members["jpg"])).convert("RGB")))
        assert "agreement" not in meta  # no model, no score

    removed = _removed(out)
    assert {k: r for k, (r, _) in removed.items()} == planted
    assert removed["png_copy"][1] == f"the same pixels as 00000.tar#{faces[3][0]}"
    for key in ("jpeg_q60", "resized", "brighter"):
        bits = int(re.match(r"(\d+) bits from", removed[key][1])[1])
        assert bits <= 8

    report = json.loads((out / "report.json").read_text())
    curation = json.loads((out / "curation.json").read_text())
    counts = {"exact_duplicate": 2, "near_duplicate": 3, **{r: 1 for r in planted.values() if "caption" in r}}
    assert report["skipped_by_reason"] == dict(sorted(counts.items()))
    assert report["samples"]["written"] == 92 and report["command"] == "curate"
    assert curation["samples"] == {"read": 101, "kept": 92, "removed": 9}
    assert curation["removed_by_filter"] == {
        "caption_too_short": 1, "caption_too_long": 0, "caption_url": 1, "caption_few_letters": 1,
        "caption_repeats": 1, "exact_duplicate": 2, "near_duplicate": 3,
    }  # fmt: skip
    assert list(curation["removed_by_filter"]) == [  # in the order the filters run
        "caption_too_short", "caption_too_long", "caption_url", "caption_few_letters", "caption_repeats",
        "exact_duplicate", "near_duplicate",
    ]  # fmt: skip
    assert curation["agreement"] is None and curation["balance"] is None
    assert curation["filters"]["max_hash_distance"] == 8 and curation["scan"]["shards"] == 4
    assert (out / "curation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _reference_scores(ckpt: Path, samples: list[dict]) -> np.ndarray:
    """Each pair's cosine, computed directly with the model's open_clip methods."""
    import flip

    model = flip.load(ckpt)
    with torch.no_grad():
        images = torch.stack(
            [model.preprocess(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples]
        )
        image = model.encode_image(images, normalize=True)
        text = model.encode_text(model.tokenize([s["txt"].decode() for s in samples]), normalize=True)
    return (image * text).sum(-1).double().numpy()


@pytest.mark.slow  # trains the demo model for STEPS
def test_the_agreement_filter_keeps_matching_pairs_over_shuffled_ones(trained, tmp_path):
    ckpt, faces = trained
    shuffled = list(range(0, 96, 3))  # a third of the captions moved to other faces of that third
    moved = {i: faces[shuffled[(k + 1) % len(shuffled)]][1]["txt"].decode() for k, i in enumerate(shuffled)}
    samples = [_sample(key, fields, moved.get(i)) for i, (key, fields) in enumerate(faces)]
    inputs = _write(tmp_path / "in", samples, per_shard=32)
    out = tmp_path / "out"
    _curate(inputs, "-o", out, "--model", ckpt, "--keep-top-fraction", 0.5, "--dedup", "none")

    reference = _reference_scores(ckpt, samples)
    written = read_shards(out)
    stored = {key: json.loads(m["json"])["agreement"] for key, m in written.items()}
    keys = [s["__key__"] for s in samples]
    top = set(np.array(keys)[np.argsort(-reference)[:48]])
    assert set(written) == top  # the best-scored half, by the reference scores
    for key, score in stored.items():
        assert score == pytest.approx(reference[keys.index(key)], abs=1e-5)
    shuffled_keys = {keys[i] for i in shuffled}
    assert len(shuffled_keys & set(written)) <= 3  # 32 shuffled pairs of 96: at most 3 kept in the top 48

    curation = json.loads((out / "curation.json").read_text())
    agreement = curation["agreement"]
    assert agreement["rule"] == "keep_top_fraction" and agreement["scored"] == 96
    assert agreement["threshold"] == pytest.approx(np.sort(reference)[-48], abs=1e-5)
    edges = np.array(agreement["histogram"]["edges"])
    assert len(edges) == 41 and sum(agreement["histogram"]["all"]) == 96
    assert sum(agreement["histogram"]["kept"]) == 48
    assert agreement["histogram"]["all"] == np.histogram(np.round(reference, 6), bins=edges)[0].tolist()
    assert curation["removed_by_filter"]["low_agreement"] == 48

    # a threshold instead: the same folder, the scans and scores read back, not computed again
    ranked = np.sort(reference)
    assert ranked[60] - ranked[59] > 1e-4  # a threshold between them is not a matter of rounding
    threshold = float(ranked[59] + ranked[60]) / 2
    _curate(inputs, "-o", out, "--model", ckpt, "--min-agreement", threshold, "--dedup", "none")
    again = json.loads((out / "curation.json").read_text())
    assert again["scan"] == {"shards": 3, "scanned_from_cache": 3, "scored_from_cache": 3}
    assert set(read_shards(out)) == {k for k, r in zip(keys, reference, strict=True) if r > threshold}
    assert again["agreement"]["rule"] == "min_agreement" and again["agreement"]["threshold"] == threshold


@pytest.mark.slow  # trains the demo model for STEPS
def test_embedding_duplicates_are_the_copies_the_models_features_put_closest(trained, tmp_path):
    import flip

    ckpt, faces = trained
    originals = [_sample(key, fields) for key, fields in faces[:40]]
    image = {i: Image.open(io.BytesIO(faces[i][1]["jpg"])).convert("RGB") for i in (4, 8)}
    copies = [
        _sample("jpeg_q90", faces[4][1], jpg=_encode(image[4], "JPEG", quality=90)),
        _sample(
            "brighter", faces[8][1], jpg=_encode(ImageEnhance.Brightness(image[8]).enhance(1.03), "JPEG")
        ),
    ]
    model = flip.load(ckpt)
    with torch.no_grad():
        pixels = [
            model.preprocess(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in originals + copies
        ]
        features = model.encode_image(torch.stack(pixels), normalize=True).numpy()
    cosine = features @ features.T
    distinct = cosine[:40, :40][~np.eye(40, dtype=bool)].max()
    closest = min(cosine[40, 4], cosine[41, 8])
    assert closest - distinct > 1e-3  # a threshold between them is not a matter of rounding
    inputs = _write(tmp_path / "in", originals + copies, per_shard=20)
    out = tmp_path / "out"
    threshold = float(distinct + closest) / 2
    _curate(inputs, "-o", out, "--model", ckpt, "--dedup", "none", "--min-embedding-cosine", threshold)
    removed = _removed(out)
    assert {k: r for k, (r, _) in removed.items()} == {
        "jpeg_q90": "embedding_duplicate",
        "brighter": "embedding_duplicate",
    }
    assert removed["jpeg_q90"][1].endswith(f"with 00000.tar#{faces[4][0]}")
    assert set(read_shards(out)) == {s["__key__"] for s in originals}


def test_balancing_caps_every_entry_at_its_limit(tmp_path):
    rng = np.random.default_rng(0)
    phrases = {"smiling": 0.7, "beard": 0.4, "eyeglasses": 0.3, "hat": 0.04}
    samples = []
    for i in range(80):
        words = [p for p, weight in phrases.items() if rng.random() < weight]
        if i < 3:
            words = ["hat", "smiling"]  # the tail shares its samples with the head
        pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        caption = "a portrait of a person " + " and ".join(f"with {w}" for w in words)
        samples.append(
            {"__key__": f"s{i:03d}", "png": _encode(Image.fromarray(pixels), "PNG"), "txt": caption.encode()}
        )
    inputs = _write(tmp_path / "in", samples, per_shard=40)
    entries = tmp_path / "entries.txt"
    entries.write_text("smiling\nbeard | bearded\neyeglasses | glasses\nhat\n")
    out = tmp_path / "out"
    _curate(inputs, "-o", out, "--entries", entries, "--max-per-entry", 10, "--dedup", "none", "--seed", 7)

    def counts(captions) -> dict[str, int]:
        captions = list(captions)
        return {p: sum(bool(re.search(rf"\bwith {p}\b", c)) for c in captions) for p in phrases}

    before = counts(s["txt"].decode() for s in samples)
    after = counts(m["txt"].decode() for m in read_shards(out).values())
    assert all(after[p] <= 10 for p in phrases) and after["smiling"] == 10
    assert before["hat"] <= 10 and after["hat"] == before["hat"]  # the tail is kept whole
    unmatched = sum(not any(w in s["txt"].decode() for w in phrases) for s in samples)
    balance = json.loads((out / "curation.json").read_text())["balance"]
    assert balance["rule"] == "cap" and balance["max_per_entry"] == 10 and balance["unmatched"] == unmatched
    assert balance["entries"] == {p: {"before": before[p], "after": after[p]} for p in phrases}
    removed = _removed(out)
    assert {r for r, _ in removed.values()} == {"entry_full"}
    assert len(read_shards(out)) == 80 - len(removed)


def test_a_killed_run_resumes_from_its_scans_and_shards(faces, tmp_path, monkeypatch):
    import flip.curation.run as run

    inputs = _write(tmp_path / "in", [_sample(k, f) for k, f in faces], per_shard=24)
    clean, out = tmp_path / "clean", tmp_path / "out"
    _curate(inputs, "-o", clean, "--samples-per-shard", 25, workers=2)  # the same bytes on any worker count

    scanned = []

    def killed_after_two(task):
        if len(scanned) == 2:
            raise KeyboardInterrupt  # what a kill while scanning the third shard leaves: two cached scans
        scanned.append(task.path)
        return scan_shard(task)

    scan_shard = run.scan_shard
    monkeypatch.setattr(run, "scan_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        main(
            [
                "curate",
                str(inputs),
                "-o",
                str(out),
                "--samples-per-shard",
                "25",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
    assert not list(out.glob("*.tar")) and len(list((out / ".curate/scan").glob("*.json"))) == 2
    monkeypatch.setattr(run, "scan_shard", scan_shard)
    _curate(inputs, "-o", out, "--samples-per-shard", 25)
    assert json.loads((out / "curation.json").read_text())["scan"]["scanned_from_cache"] == 2
    shards = sorted(p.name for p in clean.glob("*.tar"))
    assert shards == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert {n: (out / n).read_bytes() for n in shards} == {n: (clean / n).read_bytes() for n in shards}

    # a kill while writing shard 2: its stats file (written last) missing, half a tar, a temp file
    (out / "00002_stats.json").unlink()
    (out / "00002.tar").write_bytes(b"half a tar")
    (out / ".00003.tar.k1ll3d.tmp").write_bytes(b"half a tar")
    _curate(inputs, "-o", out, "--samples-per-shard", 25)
    report = json.loads((out / "report.json").read_text())
    assert report["shards_resumed"] == 3 and report["shards_written"] == 1
    assert not list(out.glob(".*.tmp"))
    assert {n: (out / n).read_bytes() for n in shards} == {n: (clean / n).read_bytes() for n in shards}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--min-agreement", "0.2"], "need a model"),
        (["--entries", "entries.txt"], "--entries needs --max-per-entry"),
        (["--max-per-entry", "3"], "--max-per-entry needs --entries"),
        (["-o", "in"], "holds input shard '00000.tar'"),
        (["--model", "missing.ckpt"], "--model 'missing.ckpt' does not exist"),
        (["--num-parts", "3", "--part", "3"], "--part 3 with --num-parts 3: accepted: 0 to 2"),
        (["--num-parts", "3"], "--num-parts 3 needs --part K, K from 0 to 2"),
    ],
)
def test_bad_flags_fail_before_anything_is_written(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    _write(
        tmp_path / "in",
        [{"__key__": "a", "jpg": _encode(Image.new("RGB", (8, 8)), "JPEG"), "txt": b"a b c"}],
        1,
    )
    (tmp_path / "entries.txt").write_text("smiling\n")
    argv = ["curate", "in", "--no-progress", *(["-o", "out"] if "-o" not in extra else []), *extra]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in (tmp_path / "in").iterdir()) == [
        "00000.tar"
    ]


def test_a_compressed_tar_is_refused_naming_it(tmp_path, capsys):
    (tmp_path / "in.tar.gz").write_bytes(b"\x1f\x8b\x08\x00rest")
    with pytest.raises(SystemExit) as stopped:
        main(["curate", str(tmp_path / "in.tar.gz"), "-o", str(tmp_path / "out")])
    assert stopped.value.code == 2 and "is a compressed tar" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_damaged_input_shards_are_counted_and_their_readable_samples_kept(tmp_path):
    def sample(key: str, seed: int) -> dict:
        pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        return {
            "__key__": key,
            "jpg": _encode(Image.fromarray(pixels), "JPEG"),
            "txt": f"a face number {seed}".encode(),
        }

    inputs = _write(tmp_path / "in", [sample("a", 0), sample("b", 1), sample("c", 2), sample("d", 3)], 2)
    data = (inputs / "00001.tar").read_bytes()
    (inputs / "00001.tar").write_bytes(data[: data.index(b"d.jpg") + 700])  # cut inside sample d
    (inputs / "00002.tar").write_bytes(b"<html>not a tar</html>")
    (inputs / "00003.tar").write_bytes(b"")
    out = tmp_path / "out"
    _curate(inputs, "-o", out)
    assert set(read_shards(out)) == {"a", "b", "c"}
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_by_reason"] == {"not_a_tar": 2, "truncated_tar": 1}
    assert report["examples"]["truncated_tar"][0]["sample"] == str(inputs / "00001.tar")
    curation = json.loads((out / "curation.json").read_text())
    assert curation["input_shard_problems"] == {"not_a_tar": 2, "truncated_tar": 1}
    assert curation["samples"] == {"read": 3, "kept": 3, "removed": 0}


def _inputs_every_part_owns_some_of(tmp_path: Path, samples: list, parts: int) -> tuple[Path, list[Path]]:
    """Shards in a folder whose name gives each part at least one: ownership hashes the resolved path, which
    holds pytest's temporary folder, so a fixed name leaves a part empty in about one run in twenty."""
    for attempt in range(100):
        inputs = _write(tmp_path / f"in-{attempt}", samples, per_shard=10)
        shards = sorted(inputs.glob("*.tar"))
        if len({part_of(str(shard.resolve()), parts) for shard in shards}) == parts:
            return inputs, shards
    raise AssertionError(f"no folder name under {tmp_path} gives each of {parts} parts a shard")


def test_parts_scan_every_shard_once_and_the_whole_run_then_only_selects_and_writes(
    faces, tiny_ckpt, tmp_path, monkeypatch, capsys
):
    import flip.curation.run as run
    from flip.curation.agreement import Scorer

    samples, _ = _planted(faces)  # duplicates across shards: the selection is over all of them
    inputs, shards = _inputs_every_part_owns_some_of(tmp_path, samples, parts=3)
    flags = ["--model", tiny_ckpt, "--keep-top-fraction", 0.8, "--min-words", 3, "--samples-per-shard", 40]
    scanned, scored = [], []
    scan_shard, score = run.scan_shard, Scorer.score
    monkeypatch.setattr(run, "scan_shard", lambda task: scanned.append(Path(task.path)) or scan_shard(task))
    monkeypatch.setattr(
        Scorer, "score", lambda self, path, s: scored.append(Path(path)) or score(self, path, s)
    )
    single, out = tmp_path / "single", tmp_path / "out"
    _curate(inputs, "-o", single, *flags)
    assert sorted(scanned) == sorted(scored) == shards
    scanned.clear(), scored.clear()

    stale = out / ".curate/scan/gone-0123.json"  # a shard no longer among the inputs
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    owners = {shard: part_of(str(shard.resolve()), 3) for shard in shards}
    assert len(set(owners.values())) == 3  # every part has work
    capsys.readouterr()
    for k in range(3):
        before = len(scanned)
        with hold_lock(out / f".curate/part-0000{(k + 1) % 3}-of-00003-lock", "another part"):  # running
            assert main(["curate", str(inputs), "-o", str(out), *map(str, flags), "--num-parts", "3",
                         "--part", str(k), "--workers", "1", "--no-progress"]) == 0  # fmt: skip
        owned = sorted(shard for shard, owner in owners.items() if owner == k)
        assert sorted(scanned[before:]) == sorted(scored[before:]) == owned
        assert json.loads(capsys.readouterr().out) == {
            "output": str(out), "part": {"index": k, "count": 3}, "inputs": len(shards), "shards": len(owned),
            "scanned": len(owned), "scanned_from_cache": 0, "scored": len(owned), "scored_from_cache": 0,
        }  # fmt: skip
    assert Counter(scanned) == Counter(scored) == Counter(shards)  # every shard once: none twice, none missed
    scanned.clear(), scored.clear()
    assert sorted(p.name for p in out.iterdir()) == [".curate"]  # no selection, no shard, no report
    assert len(list(out.glob(".curate/scan/*.json"))) == len(shards) + 1  # parts remove nothing
    assert len(list(out.glob(".curate/scores/*.npz"))) == len(shards)

    with hold_lock(out / ".curate/part-00001-of-00003-lock", "part 1"), pytest.raises(SystemExit) as busy:
        main(["curate", str(inputs), "-o", str(out), *map(str, flags), "--workers", "1", "--no-progress"])
    assert busy.value.code == 2 and "part-00001-of-00003 of output folder" in capsys.readouterr().err
    _curate(inputs, "-o", out, *flags)  # the whole run: reads every scan and score back
    assert scanned == scored == [] and not stale.exists()
    curation, alone = (json.loads((o / "curation.json").read_text()) for o in (out, single))
    n = len(shards)
    assert curation.pop("scan") == {"shards": n, "scanned_from_cache": n, "scored_from_cache": n}
    assert alone.pop("scan") == {"shards": n, "scanned_from_cache": 0, "scored_from_cache": 0}
    assert curation == alone and curation["samples"]["removed"] > 0
    assert (out / "curation_removed.jsonl").read_text() == (single / "curation_removed.jsonl").read_text()
    tars = sorted(p.name for p in single.glob("*.tar"))
    assert tars == sorted(p.name for p in out.glob("*.tar")) and len(tars) >= 2
    assert {t: (out / t).read_bytes() for t in tars} == {t: (single / t).read_bytes() for t in tars}
