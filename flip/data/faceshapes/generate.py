"""Writes FaceShapes as webdataset shards, once, and finds them again on later runs.

Every sample's randomness comes from (seed, split, index) alone, so the shards are the same
bytes for any worker count or shard layout. A run writes into a temporary folder beside
`root` and renames it into place only after the manifest is written: a killed run leaves no
half-written dataset that a later run would take for complete. The manifest fingerprints
every parameter that changes the bytes (plus VERSION, bumped whenever the generator's output
changes), so changed settings regenerate and unchanged ones cost one small file read.

With `parts` (`--parts`), each sample also holds the part mask of its face as `parts.png`
and its landmarks under `landmarks` in the `.json` (flip.data.faceshapes.render), for the
dense demo tasks. The images, captions and labels are the same bytes as without: the parts
take no random draws. Training reads neither (`parts.png` is not an image member it reads).

CLI::

    python -m flip.data.faceshapes.generate --root data/faceshapes --train 20000 --preview /tmp/sheet.png
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from flip.data.captions import CaptionGrammar
from flip.data.faceshapes.attributes import sample_attributes
from flip.data.faceshapes.grammar import FACESHAPES_GRAMMAR
from flip.data.faceshapes.render import render_face, render_face_parts
from flip.data.shards import (
    CAPTION_MEMBER,
    IMAGE_MEMBER,
    METADATA_MEMBER,
    decode_sample,
    fingerprint,
    iter_tar_samples,
    write_shard,
)
from flip.data.workers import WorkerPool
from flip.locking import hold_lock

__all__ = [
    "DEFAULT_SPLITS",
    "PARTS_MEMBER",
    "VERSION",
    "FaceShapesManifest",
    "ensure_faceshapes",
    "make_sample",
]

VERSION = "4"  # bump whenever sampling, rendering or captions change what gets written
DEFAULT_SPLITS = {"train": 20_000, "val": 1000, "test": 2000}
MANIFEST = "manifest.json"
PARTS_MEMBER = "parts.png"  # the part mask (`parts=True`): `{key}.parts.png`, never read as the image
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class FaceShapesManifest:
    """Where a generated FaceShapes lives and what it holds; `shards` paths are root-relative."""

    root: Path
    splits: dict[str, int]
    shards: dict[str, list[str]]
    fingerprint: str = ""
    params: dict = field(default_factory=dict)

    def urls(self, split: str) -> list[str]:
        """Absolute shard paths of a split, in order, for `webdataset.WebDataset`."""
        if split not in self.shards:
            raise KeyError(f"FaceShapes has no split {split!r}; it has {sorted(self.shards)}")
        return [str(self.root / rel) for rel in self.shards[split]]

    def to_json(self) -> dict:
        return {
            "version": self.params.get("version", VERSION),
            "fingerprint": self.fingerprint,
            "params": self.params,
            "splits": self.splits,
            "shards": self.shards,
        }

    @classmethod
    def load(cls, root: str | os.PathLike) -> FaceShapesManifest:
        root = Path(root).absolute()
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        return cls(
            root, dict(data["splits"]), dict(data["shards"]), data["fingerprint"], dict(data["params"])
        )


_GRAMMAR: CaptionGrammar | None = None


def _grammar() -> CaptionGrammar:
    global _GRAMMAR
    if _GRAMMAR is None:
        _GRAMMAR = CaptionGrammar(FACESHAPES_GRAMMAR)
    return _GRAMMAR


def make_sample(
    split: str, index: int, seed: int, image_size: int = 112, jpeg_quality: int = 90, parts: bool = False
) -> dict:
    """One sample as webdataset fields (`__key__`, jpg, txt, json bytes), from its own seeds;
    with `parts`, also the part mask (`parts.png`) and the landmarks (`landmarks` in the json).

    Attributes, caption and pixel noise each get their own RNG stream, so editing the
    grammar does not change the images, nor the renderer the captions.
    """
    base = f"faceshapes/{seed}/{split}/{index}"
    attributes = sample_attributes(random.Random(base + "/attributes"))
    caption = _grammar().caption(attributes, random.Random(base + "/caption"))
    render_rng = random.Random(base + "/render")
    rendered = render_face_parts(attributes, render_rng, size=image_size) if parts else None
    image = render_face(attributes, render_rng, size=image_size) if rendered is None else rendered.image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=jpeg_quality)
    key = f"{split}_{index:06d}"
    record = {
        **attributes,
        "key": key,
        "split": split,
        "index": index,
        "caption": caption.text,
        "mentions": [[name, value] for name, value in caption.mentions],
    }
    sample = {"__key__": key, IMAGE_MEMBER: buffer.getvalue(), CAPTION_MEMBER: caption.text.encode("utf-8")}
    if rendered is not None:
        record["landmarks"] = {name: [round(x, 3), round(y, 3)] for name, (x, y) in rendered.points.items()}
        mask = io.BytesIO()
        Image.fromarray(rendered.mask, "L").save(mask, format="PNG")
        sample[PARTS_MEMBER] = mask.getvalue()
    sample[METADATA_MEMBER] = json.dumps(record, sort_keys=True).encode("utf-8")
    return sample


def _write_shard(task: tuple[str, str, int, int, dict]) -> int:
    path, split, start, stop, params = task
    samples = (
        make_sample(
            split,
            index,
            params["seed"],
            params["image_size"],
            params["jpeg_quality"],
            params.get("parts", False),
        )
        for index in range(start, stop)
    )
    return write_shard(path, samples)


def _describe_task(task: tuple[str, str, int, int, dict]) -> str:
    path, split, start, stop, _ = task
    return f"FaceShapes {split} samples {start}..{stop - 1} ({os.path.basename(path)})"


def _params(
    splits: Mapping[str, int],
    samples_per_shard: int,
    image_size: int,
    seed: int,
    jpeg_quality: int,
    parts: bool = False,
) -> dict:
    for name, count in splits.items():
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            raise ValueError(f"split name {name!r} must be letters, digits, '_' or '-' (it names files)")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"split {name!r} has {count!r} samples; expected an integer >= 0")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
    if image_size < 16:
        raise ValueError(f"image_size={image_size} must be >= 16")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={jpeg_quality} must be in 1..100")
    params = {
        "version": VERSION,
        "splits": {name: int(count) for name, count in splits.items()},
        "samples_per_shard": int(samples_per_shard),
        "image_size": int(image_size),
        "seed": int(seed),
        "jpeg_quality": int(jpeg_quality),
    }
    if parts:  # only then: a dataset without parts keeps the fingerprint it always had
        params["parts"] = True
    return params


def _existing(root: Path, digest: str) -> FaceShapesManifest | None:
    try:
        manifest = FaceShapesManifest.load(root)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.fingerprint != digest:
        return None
    if not all((root / rel).is_file() for shards in manifest.shards.values() for rel in shards):
        return None
    return manifest


def _run(tasks: list[tuple[str, str, int, int, dict]], num_workers: int) -> None:
    total = sum(stop - start for _, _, start, stop, _ in tasks)
    with tqdm(total=total, desc="FaceShapes", unit="img", file=sys.stderr, disable=total == 0) as bar:
        workers = min(num_workers, len(tasks))
        if workers <= 1:
            for task in tasks:
                bar.update(_write_shard(task))
            return
        with WorkerPool(_write_shard, workers, _describe_task) as pool:
            for _task, done in pool.imap_unordered(tasks):
                bar.update(done)


def ensure_faceshapes(
    root: str | os.PathLike,
    splits: Mapping[str, int] = DEFAULT_SPLITS,
    samples_per_shard: int = 1000,
    image_size: int = 112,
    seed: int = 0,
    jpeg_quality: int = 90,
    num_workers: int = 2,
    parts: bool = False,
) -> FaceShapesManifest:
    """The dataset under `root`, generated only if it is missing or was made with other settings.

    `root` belongs to the generator: regenerating replaces it as a whole. `num_workers` does
    not change the output, so it is not part of the fingerprint. `parts` adds each face's part
    mask and landmarks (the dense demo tasks' labels).
    """
    root = Path(root).absolute()
    params = _params(splits, samples_per_shard, image_size, seed, jpeg_quality, parts)
    digest = fingerprint([params], length=16)
    found = _existing(root, digest)
    if found is not None:
        return found
    root.parent.mkdir(parents=True, exist_ok=True)
    # ranks generating the same root take turns; the first writes, the others find its manifest
    with hold_lock(root.parent / f".{root.name}.lock", f"FaceShapes root {str(root)!r}", wait=True):
        found = _existing(root, digest)  # another process may have finished meanwhile
        if found is not None:
            return found
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by killed runs
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
        try:
            shards: dict[str, list[str]] = {}
            tasks = []
            for split, count in params["splits"].items():
                (tmp / split).mkdir()
                shards[split] = []
                for shard, start in enumerate(range(0, count, samples_per_shard)):
                    rel = f"{split}/{split}-{shard:05d}.tar"
                    shards[split].append(rel)
                    tasks.append(
                        (str(tmp / rel), split, start, min(start + samples_per_shard, count), params)
                    )
            _run(tasks, num_workers)
            manifest = FaceShapesManifest(root, dict(params["splits"]), shards, digest, params)
            (tmp / MANIFEST).write_text(
                json.dumps(manifest.to_json(), indent=2, sort_keys=True), encoding="utf-8"
            )
            old = None
            if root.exists():
                old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
                root.rename(old)
            tmp.rename(root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest


# -- preview -----------------------------------------------------------------------------------


def _read_samples(urls: list[str], count: int) -> list[tuple[str, Image.Image, str]]:
    samples: list[tuple[str, Image.Image, str]] = []
    for url in urls:
        for key, fields in iter_tar_samples(url):
            sample = decode_sample(fields)
            samples.append((key, sample["image"], sample["text"]))
            if len(samples) == count:
                return samples
    return samples


def write_preview(
    manifest: FaceShapesManifest, path: str | os.PathLike, count: int = 64, columns: int = 8
) -> Path:
    """A contact sheet (images with their captions below) plus the captions as `path`.txt."""
    split = next((s for s in ("test", "val", "train") if manifest.splits.get(s)), None)
    split = split or next((s for s, n in manifest.splits.items() if n), None)
    if split is None:
        raise ValueError("FaceShapes preview: every split is empty")
    samples = _read_samples(manifest.urls(split), count)
    cell, text_h = 224, 96
    rows = (len(samples) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for i, (_key, image, caption) in enumerate(samples):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        sheet.paste(image.resize((cell, cell), Image.LANCZOS), (x, y))
        lines = textwrap.wrap(f"{i}: {caption}", width=40)[:7]
        draw.multiline_text((x + 3, y + cell + 2), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    path.with_suffix(".txt").write_text(
        "".join(f"{i}\t{key}\t{caption}\n" for i, (key, _, caption) in enumerate(samples)), encoding="utf-8"
    )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate (or find) the FaceShapes shards.")
    parser.add_argument("--root", required=True, help="dataset folder (owned by the generator)")
    parser.add_argument("--train", type=int, default=DEFAULT_SPLITS["train"])
    parser.add_argument("--val", type=int, default=DEFAULT_SPLITS["val"])
    parser.add_argument("--test", type=int, default=DEFAULT_SPLITS["test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also store each face's part mask and landmarks (the dense demo: parsing, landmarks)",
    )
    parser.add_argument(
        "--preview", help="also write a contact sheet PNG here (captions in a .txt beside it)"
    )
    parser.add_argument("--preview-count", type=int, default=64)
    args = parser.parse_args(argv)
    manifest = ensure_faceshapes(
        args.root,
        {"train": args.train, "val": args.val, "test": args.test},
        samples_per_shard=args.samples_per_shard,
        image_size=args.image_size,
        seed=args.seed,
        jpeg_quality=args.jpeg_quality,
        num_workers=args.workers,
        parts=args.parts,
    )
    counts = ", ".join(
        f"{split}: {n} in {len(manifest.shards[split])} shards" for split, n in manifest.splits.items()
    )
    print(f"FaceShapes at {manifest.root} ({counts})")
    if args.preview:
        print(f"preview: {write_preview(manifest, args.preview, args.preview_count)}")


if __name__ == "__main__":
    main()
