"""The logit parameters' constants and helpers: the recipe's initial t and b, t's ceiling,
the anisotropic initial t, and the clamp after every optimizer step.

The logit parameters (t, b) belong to the model (`FlameModel.logit_scale / logit_bias`); the
losses are stateless and take them as arguments (scale = exp(t)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INIT_LOGIT_SCALE = math.log(10.0)
INIT_LOGIT_BIAS = -10.0
MAX_LOGIT_SCALE = math.log(100.0)


def anisotropic_logit_scale(texts: torch.Tensor, base: float = 10.0) -> float:
    """An initial t for a text space whose vectors crowd into a cone: `base / sqrt(1 - c)`, with c
    the mean pairwise cosine of `texts` [N, D] (clipped to [0, 0.99], so t stays in [base, 10 * base]).

    The recipe's t = 10 assumes texts spread over the sphere. A small LLM's facet vectors do not
    (SmolLM2-135M: c = 0.91), so all logits differ by a fraction of t and the loss barely separates
    captions until t has grown, which takes more steps than a short run has. Scaling t by the
    spread gives the same initial logit range as the recipe's t = 10 on an isotropic space."""
    x = F.normalize(texts.double(), dim=-1)
    n = x.shape[0]
    if n < 2:
        return base
    c = ((x.sum(0).square().sum() - n) / (n * n - n)).item()
    return min(max(base / math.sqrt(1.0 - min(max(c, 0.0), 0.99)), base), math.exp(MAX_LOGIT_SCALE))


def clamp_logit_scale_(logit_scale: torch.Tensor) -> None:
    """In-place clamp of t to [0, log 100] (call after every optimizer step)."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
