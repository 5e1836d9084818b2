"""The non-finite guard: a step whose loss or gradient is NaN/inf on any rank is skipped on every
rank (one all-reduce decides), and a run of `limit` such steps stops the job. Weights that
overflowed are never saved: the last checkpoint stays the last finite one."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from flame import distributed as dist


def all_finite(tensors: Iterable[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """One device-side flag: every element of every tensor (dense or sparse) is finite."""
    flags = [torch.isfinite(t.coalesce().values() if t.is_sparse else t).all() for t in tensors if t is not None]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)


class NonFiniteGuard:
    def __init__(self, limit: int, device: torch.device):
        self.limit, self.device = limit, device
        self.in_a_row = self.total = self.since_log = 0

    def skip(self, loss: torch.Tensor, model: torch.nn.Module) -> bool:
        """Whether this step's update is skipped (the same answer on every rank)."""
        ok = torch.isfinite(loss) & all_finite((q.grad for q in model.parameters()), self.device)
        skip = bool(dist.all_reduce_max((~ok).to(torch.int32)).item())
        if skip:
            self.in_a_row, self.total, self.since_log = self.in_a_row + 1, self.total + 1, self.since_log + 1
        else:
            self.in_a_row = 0
        return skip

    def message(self, step: int) -> str:
        return (f"step {step}: non-finite loss or gradient: update skipped ({self.in_a_row} in a row, "
                f"{self.total} in all)")

    def check_run(self, step: int, last_saved: Path | None) -> None:
        """Stop (on every rank) after `limit` skipped steps in a row."""
        if self.in_a_row >= self.limit:
            kept = f"the last checkpoint, {last_saved}, has finite weights" if last_saved else "none saved"
            raise dist.AgreedError(
                f"{self.in_a_row} consecutive steps (up to step {step}) had a non-finite loss or gradient; "
                f"stopping ({kept}). Check the data (NaN/inf rows in the store?) or lower --lr, then --resume"
            )

    def check_weights(self, model: torch.nn.Module, step: int, last_saved: Path | None) -> None:
        """Refuse to save weights that are not finite (the same weights on every rank: all stop)."""
        if not bool(all_finite(model.parameters(), self.device)):
            kept = f"the last checkpoint, {last_saved}," if last_saved else "no checkpoint"
            raise dist.AgreedError(
                f"the weights are not finite at step {step} (an update overflowed): not saving them; "
                f"{kept} has finite weights. Lower --lr and --resume from it"
            )

    def logged(self) -> int:
        """Skipped steps since the last log line (and start counting anew)."""
        n, self.since_log = self.since_log, 0
        return n
