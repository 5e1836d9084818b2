"""`--lock-image` / `--lock-image-unlocked N`: a frozen (LiT, ShareLock) or partly frozen trunk.

What open_clip's `lock_image_tower` does, for FLAME's trunks: every trunk parameter stops
requiring a gradient, except those of the last N transformer blocks and, when N > 0, of a final
norm after them (FLAME's trunks run without their final norm, so today there is none to unlock).
The projector and the logit scale and bias stay trainable. A frozen parameter gets no gradient,
no optimizer state and no weight decay (`optim.param_groups` takes trainable parameters only;
the trainable ones decay as before), and no DDP bucket (DDP skips parameters that need no
gradient), so the locking is done before the optimizer and DDP are built.

Norm statistics: LayerNorm has none (its scale and bias are frozen like any weight). A batch
norm in the frozen part (a hybrid timm trunk's CNN stem) is frozen with its statistics, as
open_clip's `freeze_bn_stats`: it always normalises with its running mean and variance and
never updates them, in training too. It is frozen in place, so the state dict keeps its keys.
"""

from __future__ import annotations

import types

from torch import nn

from flame.errors import FlameError
from flame.vision import OpenClipTrunk, TimmTrunk, Trunk


def blocks_and_final_norm(trunk: Trunk) -> tuple[list[nn.Module], list[nn.Module]]:
    """The trunk's transformer blocks in order, and the norms after them (parameter-free
    Identities in FLAME's trunks)."""
    if isinstance(trunk, OpenClipTrunk):
        return list(trunk.vit.transformer.resblocks), [trunk.vit.ln_post]
    if isinstance(trunk, TimmTrunk):
        model = trunk.model
        norms = [getattr(model, a) for a in ("norm", "fc_norm") if isinstance(getattr(model, a, None), nn.Module)]
        return list(model.blocks), norms
    raise FlameError(f"cannot lock a {type(trunk).__name__} trunk (only open_clip and timm ViT trunks)")


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return self  # a frozen batch norm ignores .train(): it keeps normalising with its running statistics


def freeze_norm_statistics(module: nn.Module) -> None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        module.eval()
        module.train = types.MethodType(_stay_in_eval, module)


def lock_trunk(trunk: Trunk, unlocked: int = 0) -> dict:
    """Freeze `trunk` but its last `unlocked` blocks (and final norm); returns the parameter
    counts {"frozen": n, "trainable": n} of the trunk."""
    blocks, norms = blocks_and_final_norm(trunk)
    if unlocked > len(blocks):
        raise FlameError(f"--lock-image-unlocked {unlocked}: the trunk has only {len(blocks)} blocks")
    for p in trunk.parameters():
        p.requires_grad_(False)
    kept = blocks[len(blocks) - unlocked:] + (norms if unlocked else [])
    for module in kept:
        for p in module.parameters():
            p.requires_grad_(True)
    trainable = {id(m) for k in kept for m in k.modules()}
    for module in trunk.modules():
        if id(module) not in trainable:
            freeze_norm_statistics(module)
    counts = {"frozen": 0, "trainable": 0}
    for p in trunk.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts
