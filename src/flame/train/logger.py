"""What a run reports: RUN/log.jsonl and TensorBoard (`Logger`), the progress bar and console
lines (`Console`), and the running loss and speed between two log lines (`Meter`). Rank 0
writes; on the other ranks every method is a no-op."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from flame import distributed as dist
from flame.errors import FlameError
from flame.runfolder import write_file

log = logging.getLogger("flame.train")


class Logger:
    """RUN/log.jsonl (one JSON record per line) and, optionally, TensorBoard scalars. A resumed
    run first drops the lines past its step (they will be recomputed) and torn ones."""

    def __init__(self, run: Path, enabled: bool, tensorboard: bool, start_step: int):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        self.path = run / "log.jsonl"
        if self.path.is_file():
            self._truncate(start_step)
        self.jsonl = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            except Exception as e:  # tensorboard missing or broken: keep training
                log.warning("tensorboard disabled: %s", e)

    def _truncate(self, start_step: int) -> None:
        kept, torn = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                record, torn = None, torn + 1  # a job killed in the middle of writing it
            if isinstance(record, dict) and record.get("step", 0) <= start_step:
                kept.append(line)
        if torn:
            log.warning("%s: dropped %d torn line(s) left by an interrupted job", self.path, torn)
        write_file(self.path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        except OSError as e:
            raise FlameError(
                f"cannot write {self.path} ({e.strerror or e}); free some space and rerun with --resume"
            ) from None
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k if k.startswith("eval/") else f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class Console:
    """The progress bar (images) and the lines printed beside it (rank 0 only)."""

    def __init__(self, enabled: bool, progress: bool, total: int, done: int, desc: str = "train"):
        self.enabled = enabled
        self.bar = None
        if enabled and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", unit_scale=True, dynamic_ncols=True, desc=desc)

    def say(self, line: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(line)

    def advance(self, images: int) -> None:
        if self.bar is not None:
            self.bar.update(images)

    def postfix(self, loss: float | None) -> None:
        if self.bar is not None and loss is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Meter:
    """The loss summed over the micro-batches of the steps that were taken, and the images per
    second, since the last log line; `mean_loss` averages over every rank (a collective)."""

    def __init__(self, step: int, device: torch.device):
        self.device = device
        self.reset(step)

    def reset(self, step: int) -> None:
        self.t, self.step = time.perf_counter(), step
        self.loss_sum, self.loss_n = torch.zeros((), device=self.device), 0

    def add(self, loss: torch.Tensor, micro_batches: int) -> None:
        self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + micro_batches

    def mean_loss(self) -> float | None:
        return float(dist.all_reduce_mean(self.loss_sum / self.loss_n)) if self.loss_n else None

    def images_per_s(self, step: int, global_batch: int) -> float:
        return (step - self.step) * global_batch / max(1e-9, time.perf_counter() - self.t)
