"""The run state: what a resume needs besides the weights, optimizer and scheduler.

`TrainState` is the step plus this rank's data-stream bookkeeping (batches drawn, each loader
worker's (epoch, position), its skip counters) and the random generators. `state_dict()` is
this rank's part as plain data; `checkpoint_state` gathers every rank's part into the layout of
`state.pt` (per-rank lists), and `TrainState.resume` reads it back:

    state.pt = {"step", "optimizer", "scheduler", "world_size", "workers",
                "batches": [per rank], "positions": [per rank], "counts": [per rank], "rng": [per rank],
                "data": the data signature, "schedule": {"steps", "epochs", "total"}}
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from flame import distributed as dist

log = logging.getLogger("flame.train")
PER_RANK = ("batches", "positions", "counts", "rng")
COUNTS = ("missing", "undecodable", "samples")


@dataclass
class TrainState:
    step: int = 0
    batches: int = 0  # micro-batches this rank has drawn
    # loader worker -> (epoch, position), and for a weighted mix its order's counters (flame.data.mix)
    positions: dict[int, tuple[int, ...]] = field(default_factory=dict)
    counts: dict[int, dict[str, int]] = field(default_factory=dict)  # loader worker -> COUNTS

    def observe(self, stream_state: dict) -> None:
        """Account for one micro-batch from the loader (its "state" entry)."""
        self.batches += 1
        worker = stream_state["worker"]
        self.positions[worker] = (stream_state["epoch"], stream_state["pos"], *stream_state.get("mix", ()))
        self.counts[worker] = {k: stream_state[k] for k in COUNTS}

    @property
    def epoch(self) -> int:
        return max((v[0] for v in self.positions.values()), default=0)

    def totals(self) -> list[int]:
        """This rank's [missing, undecodable, samples] over its workers."""
        return [sum(c[k] for c in self.counts.values()) for k in COUNTS]

    def state_dict(self) -> dict:
        """This rank's part, as plain data (loadable with weights_only=True)."""
        return {"batches": self.batches, "positions": {k: list(v) for k, v in self.positions.items()},
                "counts": self.counts, "rng": rng_state()}

    def load_state_dict(self, d: dict) -> None:
        self.batches = int(d["batches"])
        self.positions = {int(k): tuple(v) for k, v in d["positions"].items()}
        self.counts = {int(k): v for k, v in d["counts"].items()}
        set_rng_state(d["rng"])

    def resume(self, saved: dict, workers: int) -> None:
        """Continue from a checkpoint's state.pt. With the same ranks and loader workers every
        stream and generator continues exactly; otherwise the data restarts at the next epoch."""
        self.step = int(saved["step"])
        rank, world = dist.rank(), dist.world_size()
        if saved.get("world_size") == world and saved.get("workers") == workers:
            self.load_state_dict({k: saved[k][rank] for k in PER_RANK})
            return
        epoch = max((v[0] for r in saved["positions"] for v in r.values()), default=0) + 1
        self.positions = {w: (epoch, 0) for w in range(max(1, workers))}
        log.warning("resuming with a different world size / worker count: data restarts at epoch %d", epoch)


def checkpoint_state(state: TrainState, optimizer, scheduler, *, workers: int, data: dict, schedule: dict) -> dict:
    """state.pt's contents (a collective: every rank calls it, each rank's part is gathered)."""
    ranks = dist.all_gather_object(state.state_dict())
    return {"step": state.step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "world_size": dist.world_size(), "workers": workers, **{k: [r[k] for r in ranks] for k in PER_RANK},
            "data": data, "schedule": schedule}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as plain data (lists, numbers, strings, tensors): loadable with
    torch.load(weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's state; this rank used
        cuda = cuda[dist.local_rank() % len(cuda)]  # cuda:LOCAL_RANK then (flame.distributed.resolve_device)
    torch.cuda.set_rng_state(cuda)
