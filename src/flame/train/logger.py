"""What a run reports: RUN/log.jsonl, TensorBoard and Weights & Biases (`Logger`, the
destinations of `--report-to`), the progress bar and console lines (`Console`), and the running
loss and speed between two log lines (`Meter`). Rank 0 writes; on the other ranks every method
is a no-op."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from flame import distributed as dist
from flame.errors import FlameError, first_line
from flame.runfolder import write_file

log = logging.getLogger("flame.train")
DEFAULT_REPORT_TO = ("jsonl", "tensorboard")
WANDB_ID = "wandb-id"  # RUN/wandb-id: the W&B run id, so a resumed job logs to the same run


def destinations(report_to: str | None, tensorboard: bool = True) -> tuple[str, ...]:
    """`--report-to` (None: jsonl,tensorboard) less tensorboard under `--no-tensorboard`; wandb
    only when it is installed. One FlameError line otherwise."""
    given = report_to is not None
    names = DEFAULT_REPORT_TO if not given else () if report_to.strip() == "none" else tuple(
        n.strip() for n in report_to.split(","))
    if not tensorboard:
        if given and "tensorboard" in names:
            raise FlameError(f"--no-tensorboard contradicts --report-to {report_to}")
        names = tuple(n for n in names if n != "tensorboard")
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise FlameError("--report-to wandb: wandb is not installed (pip install wandb, or leave it out)")
    return names


def scalars(record: dict) -> dict[str, float]:
    """A log record's numbers under their TensorBoard / W&B names (train/KEY, eval/...)."""
    return {k if k.startswith("eval/") else f"train/{k}": v for k, v in record.items()
            if k != "step" and isinstance(v, int | float)}


class Logger:
    """RUN/log.jsonl (one JSON record per line), TensorBoard scalars and W&B history, as
    `report_to` says (a bool: the old --tensorboard switch beside log.jsonl). A resumed run first
    drops the log.jsonl lines past its step (they will be recomputed) and torn ones."""

    def __init__(self, run: Path, enabled: bool, report_to: bool | Sequence[str], start_step: int,
                 config: dict | None = None):
        self.enabled = enabled
        self.tb = self.jsonl = self.wandb = None
        names = destinations(None, report_to) if isinstance(report_to, bool) else tuple(report_to)
        error = None
        if enabled:
            self.path = run / "log.jsonl"
            if self.path.is_file():
                self._truncate(start_step)
            self.jsonl = self.path.open("a") if "jsonl" in names else None
            if "tensorboard" in names:
                self.tb = _tensorboard(run, start_step)
            try:
                self.wandb = _wandb(run, config or {}) if "wandb" in names else None
            except FlameError as e:
                error = str(e)
        dist.check_errors(error)

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
            if self.jsonl is not None:
                self.jsonl.write(json.dumps(record) + "\n")
                self.jsonl.flush()
        except OSError as e:
            raise FlameError(
                f"cannot write {self.path} ({e.strerror or e}); free some space and rerun with --resume"
            ) from None
        if self.tb is not None:
            for k, v in scalars(record).items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars(record), step=record["step"])

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tensorboard(run: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(run / "tensorboard"), purge_step=start_step + 1 if start_step else None)
    except Exception as e:  # tensorboard missing or broken: keep training
        log.warning("tensorboard disabled: %s", e)
        return None


def _wandb(run: Path, config: dict):
    """A W&B run under RUN/wandb (project $WANDB_PROJECT or "flame", named after the run folder),
    the same one again when the job is resumed (its id is kept in RUN/wandb-id)."""
    import wandb

    id_file = run / WANDB_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:16]
        write_file(id_file, run_id + "\n")
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "flame"), name=run.resolve().name, dir=str(run),
                          id=run_id, resume="allow", config=config,
                          settings=wandb.Settings(console="off", silent=True))
    except Exception as e:  # no login, no network without WANDB_MODE=offline, a bad setting
        raise FlameError(f"--report-to wandb: {first_line(e)} (WANDB_MODE=offline logs without an account)") from None


class Console:
    """The progress bar (images) and the lines printed beside it (rank 0 only)."""

    def __init__(self, enabled: bool, progress: bool, total: int, done: int, desc: str = "train"):
        self.enabled = enabled
        self.bar = None
        if enabled and progress:
            from flame.progress import progress

            self.bar = progress(total=total, initial=done, unit="img", unit_scale=True, desc=desc)

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
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_n = torch.zeros((), dtype=torch.int64, device=self.device)

    def add(self, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        """A step's loss, left out when `skipped` (a device flag: no host sync)."""
        self.loss_sum = self.loss_sum + torch.where(skipped.bool(), torch.zeros_like(loss), loss)
        self.loss_n = self.loss_n + (1 - skipped)

    def mean_loss(self) -> float | None:
        n = int(self.loss_n)  # the same on every rank (the skip flag is agreed)
        return float(dist.all_reduce_mean(self.loss_sum / n)) if n else None

    def images_per_s(self, step: int, global_batch: int) -> float:
        return (step - self.step) * global_batch / max(1e-9, time.perf_counter() - self.t)
