"""The non-finite guard: a step whose loss or gradient is NaN/inf on any rank is skipped on every
rank, and a run of `limit` such steps stops the job. Weights that overflowed are never saved: the
last checkpoint stays the last finite one.

Decided on the device, with no host sync per step: the step's flag is one all-reduce (MAX) of a
device scalar, and it reaches the optimizer as `found_inf`, with which torch's fused AdamW skips
its update on the device (the mechanism GradScaler uses). The counts stay on the device too and
are read (`settle`, one sync) at each log line and checkpoint, so a run of `limit` non-finite
steps stops the job at the first log or checkpoint after it, with the last finite checkpoint kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from flame import distributed as dist


def all_finite(tensors: Iterable[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """One device-side flag: every element of every tensor (dense or sparse) is finite. One
    fused max-abs per dtype and device (`torch._foreach_norm` with ord inf: NaN and inf propagate,
    no finite value overflows) instead of an isfinite kernel per tensor."""
    dense = [t.coalesce().values() if t.is_sparse else t for t in tensors if t is not None]
    if not dense:
        return torch.ones((), dtype=torch.bool, device=device)
    groups: dict = {}
    for t in dense:
        groups.setdefault((t.device, t.dtype), []).append(t.detach())
    maxima = [m.float().to(device) for ts in groups.values() for m in torch._foreach_norm(ts, float("inf"))]
    return torch.isfinite(torch.stack(maxima)).all()


def step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """`optimizer.step()` unless `bad` (a device scalar, 1 = skip). An optimizer whose groups are
    all fused takes `found_inf` and decides on the device; any other one (e.g. one resumed from a
    checkpoint of a foreach optimizer, whose saved groups say fused=False) costs a host sync here."""
    if getattr(optimizer, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in optimizer.param_groups):
        optimizer.found_inf = bad.float()
        optimizer.step()
    elif not bool(bad):
        optimizer.step()


class NonFiniteGuard:
    def __init__(self, limit: int, device: torch.device):
        self.limit, self.device = limit, device
        zero = torch.zeros((), dtype=torch.int64, device=device)
        # on the device: the current run of skipped steps, the longest run since `settle`, counts
        self.run, self.worst, self.count, self.since_log = zero.clone(), zero.clone(), zero.clone(), zero.clone()
        self.total = 0  # skipped steps in all, as of the last log line

    def flag(self, loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        """This step's device flag (int64 0/1, the same on every rank): 1 = skip its update."""
        ok = torch.isfinite(loss) & all_finite((q.grad for q in model.parameters()), self.device)
        bad = dist.all_reduce_max((~ok).to(torch.int64))
        self.run = (self.run + bad) * bad
        self.worst = torch.maximum(self.worst, self.run)
        self.count += bad
        self.since_log += bad
        return bad

    def settle(self, step: int, last_saved: Path | None) -> None:
        """Stop (on every rank: the counts are the same) after `limit` skipped steps in a row."""
        worst = int(self.worst)
        self.worst.copy_(self.run)
        if worst >= self.limit:
            kept = f"the last checkpoint, {last_saved}, has finite weights" if last_saved else "none saved"
            raise dist.AgreedError(
                f"{worst} consecutive steps (by step {step}) had a non-finite loss or gradient; "
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
        """Skipped steps since the last log line (and start counting anew; one sync)."""
        n = int(self.since_log)
        self.since_log.zero_()
        self.total = int(self.count)
        return n
