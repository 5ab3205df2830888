"""Wall-clock time of every training step, for throughput measurements (bench/train_throughput.py).

Each step is timed from the end of the previous one, as open_clip's trainer times its batches,
so data loading, the step, the hooks, logging and the progress bar all count.

    python train.py '+callbacks.step_times={_target_: flip.training.throughput.StepTimes, path: times.json}'
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L


class StepTimes(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.ends: list[float] = []
        self.batch_sizes: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.ends = [time.perf_counter()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.ends.append(time.perf_counter())
        self.batch_sizes.append(len(batch[0]))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            steps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"step_seconds": steps, "batch_sizes": self.batch_sizes}))
