"""WebDataset shards as FLIP's pipeline and img2dataset write them, and read back member by member."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pandas as pd
import webdataset as wds
from PIL import Image

from .images import COLOURS, jpeg_bytes


def write_caption_shards(
    directory: Path, count: int, per_shard: int, seed: int = 0, with_json: bool = True
) -> list[str]:
    """Random-colour images with captions naming the colour: a minimal (image, caption) dataset."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    colours = {**COLOURS, "yellow": (230, 220, 30)}
    urls = []
    for shard in range((count + per_shard - 1) // per_shard):
        path = directory / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                name = rng.choice(sorted(colours))
                sample = {"__key__": f"{i:06d}", "jpg": jpeg_bytes(colours[name]), "txt": f"a {name} square"}
                if with_json:
                    sample["json"] = json.dumps({"colour": name, "red": name == "red"}).encode()
                sink.write(sample)
        urls.append(str(path))
    return urls


def read_shards(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of the folder's shards by key, each member's bytes by extension; a member
    written twice fails, as a reader would silently keep only one of them."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                assert ext not in samples.get(key, {}), f"{key}.{ext} written twice"
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_img2dataset(folder: Path, shards: list[list[dict]]) -> list[Path]:
    """Shards exactly as img2dataset writes them: NNNNN.tar with {key}.jpg/.txt/.json, plus
    NNNNN.parquet and NNNNN_stats.json beside each. A sample dict holds url, caption, image
    (PIL) and optionally original_size (what the image was before img2dataset resized it)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard_id, samples in enumerate(shards):
        rows = []
        with wds.TarWriter(str(folder / f"{shard_id:05d}.tar")) as sink:
            for index, sample in enumerate(samples):
                key = f"{shard_id:05d}{index:04d}"
                data = _jpeg(sample["image"])
                width, height = sample["image"].size
                original = sample.get("original_size", (width, height))
                meta = {
                    "url": sample["url"],
                    "caption": sample["caption"],
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": width,
                    "height": height,
                    "original_width": original[0],
                    "original_height": original[1],
                    "exif": None,
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                sink.write({"__key__": key, "jpg": data, "txt": sample["caption"], "json": json.dumps(meta)})
                rows.append(meta)
        pd.DataFrame(rows).to_parquet(folder / f"{shard_id:05d}.parquet")
        stats = {
            "count": len(samples),
            "successes": len(samples),
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": 1.0,
            "start_time": 0.0,
            "end_time": 1.0,
            "status_dict": {"success": len(samples)},
        }
        (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats))
        paths.append(folder / f"{shard_id:05d}.tar")
    return paths
