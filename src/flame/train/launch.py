"""`train(cfg)`: one process per device (torchrun or alone). Every rank validates and plans; the
first error (rank 0's if it has one) is what every rank reports, so a job fails as one line."""

from __future__ import annotations

from pathlib import Path

import torch

from flame import distributed as dist
from flame.errors import FlameError, first_line
from flame.train.checkpoint import RunLock
from flame.train.config import TrainConfig, validate
from flame.train.loop import Trainer
from flame.train.plan import plan


def train(cfg: TrainConfig) -> int:
    device = dist.init(cfg.device)
    try:  # an error all ranks agree on is printed by rank 0 alone; one rank's own names the rank
        return dist.report_once(lambda: _train(cfg, device))
    except torch.distributed.DistError as e:  # a peer died (its own error says why): one line, not a traceback
        if dist.world_size() == 1:
            raise
        raise FlameError(f"rank {dist.rank()}: lost contact with another rank ({first_line(e, 200)})") from e
    finally:
        dist.shutdown()


def _train(cfg: TrainConfig, device: torch.device) -> int:
    lock, error, p = None, None, None
    try:
        validate(cfg)
        if dist.is_main():
            lock = RunLock(Path(cfg.out))
        p = plan(cfg)
    except FlameError as e:
        error = str(e)
    try:
        dist.check_errors(error)
        same_checkpoint(p)
        return Trainer(cfg, p, device).fit()
    finally:
        if lock is not None:
            lock.release()


def same_checkpoint(p) -> None:
    """Every rank resolved `--resume` on its own (`latest` in the run folder): on a filesystem that
    is not yet consistent, ranks could load different steps, which DDP never re-syncs and whose
    unequal step counts end in a hang. All must name the same checkpoint at the same step."""
    seen = dist.all_gather_object((str(p.resume_from), p.resume_state["step"] if p.resume_state else 0))
    if len(set(seen)) > 1:
        rank = next(r for r, s in enumerate(seen) if s != seen[0])
        raise dist.AgreedError(f"--resume: rank 0 resumes from {seen[0][0]} (step {seen[0][1]}) but rank {rank} from "
                         f"{seen[rank][0]} (step {seen[rank][1]}): is the run folder the same, and in sync, on "
                         "every machine?")
