"""Validation on `data.val_shards` under DDP: every rank runs the same batches, each sample once.

`validation_step` all-gathers features, so ranks with different numbers or sizes of batches
abort (gloo) or hang (NCCL). Two real gloo processes build the validation loader through
`ShardDataModule.val_dataloader` and all-gather every batch, as the loss does.
"""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image

from flip.data.datamodule import ShardDataModule
from flip.models import build_model

from .helpers import SHARDS_BASE, TINY_ARCH, free_port, run_train_py, write_caption_shards


def _worker(rank: int, world: int, port: int, cases: dict[str, tuple[list[str], int]], out: str) -> None:
    torch.set_num_threads(1)
    timeout = timedelta(seconds=30)
    address = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world, timeout=timeout)
    model = build_model("flip-test-tiny", TINY_ARCH).eval()
    results = {}
    for name, (urls, workers) in cases.items():
        dm = ShardDataModule(urls, urls, batch_size=4, val_batch_size=4, num_workers=workers)
        dm.use_model(model)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)  # what Lightning's trainer tells it
        sizes, captions = [], []
        for images, texts, *_ in dm.val_dataloader():
            # the loss all-gathers each batch's features: a size that differs between ranks fails here
            gathered = [torch.empty_like(images[:, 0, 0, 0]) for _ in range(world)]
            dist.all_gather(gathered, images[:, 0, 0, 0].contiguous())
            sizes.append(len(images))
            captions.extend(texts.tolist())  # each sample's caption is unique: its tokens name it
        results[name] = {"sizes": sizes, "captions": captions}
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


CASES = {
    "3-shards": ([4, 4, 1], 0),
    "1-shard": ([5], 0),
    "1-shard-2-workers": ([10], 2),
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """Both ranks' validation batches for every case of CASES, from one 2-process gloo run."""
    root = tmp_path_factory.mktemp("val-ddp")
    cases = {
        name: (_numbered_shards(root / name, sizes), workers) for name, (sizes, workers) in CASES.items()
    }
    port = free_port()
    out = str(root / "ranks")
    mp.spawn(_worker, args=(2, port, cases, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    return {name: [r[name] for r in ranks] for name in CASES}


def _numbered_shards(folder: Path, sizes: list[int]) -> list[str]:
    """Shards of `sizes` samples whose captions name each sample: 'sample number 7'."""
    folder.mkdir(parents=True)
    urls, index = [], 0
    for shard, size in enumerate(sizes):
        path = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(size):
                image = io.BytesIO()
                Image.new("RGB", (24, 24), (index * 7 % 255, 90, 90)).save(image, format="JPEG")
                sink.write(
                    {"__key__": f"{index:06d}", "jpg": image.getvalue(), "txt": f"sample number {index}"}
                )
                index += 1
        urls.append(str(path))
    return urls


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_gets_equal_validation_batches_and_each_sample_once(two_ranks, case):
    ranks, (sizes, _) = two_ranks[case], CASES[case]
    assert ranks[0]["sizes"] == ranks[1]["sizes"], [r["sizes"] for r in ranks]
    total = sum(sizes)
    assert sum(ranks[0]["sizes"]) == total // 2
    # each sample once over the ranks, all but the odd one out when the total is odd
    tokenizer = build_model("flip-test-tiny", TINY_ARCH).tokenizer
    tokens = {tuple(tokenizer([f"sample number {i}"])[0].tolist()): i for i in range(total)}
    seen = [tokens[tuple(row)] for rank in ranks for row in rank["captions"]]
    assert sorted(seen) == list(range(total // 2 * 2))


@pytest.mark.slow
def test_ddp_validation_on_val_shards_through_train_py_completes(tmp_path):
    """The issue's case: 2 gloo ranks, 3 validation shards of 4, 4 and 1 samples."""
    train = write_caption_shards(tmp_path / "train", count=32, per_shard=16)
    val = write_caption_shards(tmp_path / "val", count=9, per_shard=4, seed=1)
    done = run_train_py(
        *SHARDS_BASE, "trainer=ddp", "trainer.devices=2", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null",
        f"data.train_shards=[{','.join(train)}]", f"data.val_shards=[{','.join(val)}]",
        "data.batch_size=4", "data.val_batch_size=4", "data.num_workers=0", "data.samples_per_epoch=16",
        "data.shuffle_buffer=8", f"hydra.run.dir={tmp_path / 'run'}",
        flip_root=tmp_path, threads=1,
    )  # fmt: skip
    assert "MEMBER: 2/2" in done.stdout + done.stderr
    metrics = next((tmp_path / "run" / "csv").glob("version_*/metrics.csv")).read_text()
    assert "val/loss" in metrics
