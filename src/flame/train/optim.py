"""AdamW with decoupled weight decay on weight matrices only, and the warm-up + cosine schedule.

Which parameters decay is the model's to say, timm-style: every parameter with two or more
dimensions decays (linear and conv weights, positional embeddings); 0-d and 1-d ones (biases,
norm scales, class tokens, the logit scale and bias) do not; and a model may exempt more by
name with a `no_weight_decay()` method returning parameter names.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, not decayed] parameter groups of `model` (trainable parameters only)."""
    exempt = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine from the peak to `min_ratio` of it at `steps`."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel per parameter group on CUDA and CPU, and a skipped update
    decided on the device: `flame.train.guard.step_unless`), or the foreach one where the
    parameters' device or dtype has no fused kernel."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def schedule(optimizer: torch.optim.Optimizer, warmup: int, steps: int, lr: float,
             min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, steps, min_lr / lr))
