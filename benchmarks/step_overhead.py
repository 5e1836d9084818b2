"""What a training step spends beside forward and backward, before and after issue 15 item 10, on
the same parameters and gradients in one process: the non-finite check plus the AdamW update.

- before: an isfinite kernel per gradient, a host read of the verdict (`.item()`, a device sync
  on CUDA), then foreach AdamW when the step is kept;
- after: one fused max-abs per dtype (`flame.train.guard.all_finite`), the verdict left on the
  device and handed to fused AdamW as `found_inf` (`step_unless`).

    PYTHONPATH=src .venv/bin/python benchmarks/step_overhead.py [TOWER] [D] [ROUNDS]

Defaults: vit-b-16 (the paper's tower) with the per-token projector into D = 576, 5 rounds
alternating the two; prints the median ms of each and the ratio.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from flame.train.guard import NonFiniteGuard, step_unless
from flame.train.optim import param_groups
from flame.vision import ImageTower, TowerConfig


def before(model, opt) -> None:
    flags = [torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None]
    if not bool(torch.stack(flags).all().logical_not().item()):
        opt.step()


def after(model, opt, guard) -> None:
    step_unless(opt, guard.flag(torch.zeros(()), model))


def main(argv: list[str]) -> None:
    tower, dim = (argv[0] if argv else "vit-b-16"), int(argv[1]) if len(argv) > 1 else 576
    rounds = int(argv[2]) if len(argv) > 2 else 5
    torch.manual_seed(0)
    model = ImageTower(TowerConfig(tower=tower, embed_dim=dim, proj_hidden=dim))
    for q in model.parameters():
        q.grad = torch.randn_like(q) * 1e-3
    groups = param_groups(model, 0.1)
    opts = {"before": torch.optim.AdamW(groups, lr=1e-4), "after": torch.optim.AdamW(
        param_groups(model, 0.1), lr=1e-4, fused=True)}
    guard = NonFiniteGuard(20, torch.device("cpu"))
    steps = {"before": lambda: before(model, opts["before"]), "after": lambda: after(model, opts["after"], guard)}
    for f in steps.values():
        f()  # optimizer state allocated
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            t = time.perf_counter()
            for _ in range(5):
                steps[name]()
            times[name].append((time.perf_counter() - t) / 5 * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = sum(q.numel() for q in model.parameters())
    print(json.dumps({"tower": tower, "params": n, "tensors": len(list(model.parameters())),
                      "threads": torch.get_num_threads(), "ms": times, "median_ms": med,
                      "speedup": med["before"] / med["after"]}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
