"""The training losses, by name (`LOSSES`, `flame train --loss`), and the logit parameters'
constants and helpers.

    mp-sigmoid  FLAME's multi-positive sigmoid loss (FLAME.md section 5; the default)
    mp-softmax  the FLAME release's multi-positive softmax (its --mp-nce)
    siglip      SigLIP, one positive per image
    clip        CLIP's symmetric softmax, one positive per image

All use the global batch's negatives across ranks (`flame.loss.base`).
"""

from __future__ import annotations

from flame.loss.base import FlameLoss
from flame.loss.scale import (
    INIT_LOGIT_BIAS,
    INIT_LOGIT_SCALE,
    MAX_LOGIT_SCALE,
    anisotropic_logit_scale,
    clamp_logit_scale_,
)
from flame.loss.sigmoid import MultiPositiveSigmoidLoss, SigLipLoss
from flame.loss.softmax import ClipLoss, MultiPositiveSoftmaxLoss

LOSSES: dict[str, type[FlameLoss]] = {
    cls.name: cls for cls in (MultiPositiveSigmoidLoss, MultiPositiveSoftmaxLoss, SigLipLoss, ClipLoss)
}
DEFAULT_LOSS = MultiPositiveSigmoidLoss.name


def make_loss(name: str) -> FlameLoss:
    """The loss registered as `name` (one of `LOSSES`)."""
    return LOSSES[name]()


__all__ = [
    "DEFAULT_LOSS", "INIT_LOGIT_BIAS", "INIT_LOGIT_SCALE", "LOSSES", "MAX_LOGIT_SCALE", "ClipLoss", "FlameLoss",
    "MultiPositiveSigmoidLoss", "MultiPositiveSoftmaxLoss", "SigLipLoss", "anisotropic_logit_scale",
    "clamp_logit_scale_", "make_loss",
]
