"""FLAME's multi-positive sigmoid loss (FLAME.md section 5): SigLIP with m positives per image.

For B images and their m sampled text embeddings each (B*m texts), the logits are
``exp(t) * img @ txt.T + b`` over all B x mB pairs, the label is +1 for an image's own m
texts and -1 for every other text, and

    loss = -sum(logsigmoid(label * logit)) / (m * B)

With m = 1 this is exactly the SigLIP loss. Under torch.distributed the text side (which has
no gradient: it comes from the frozen LLM) is all-gathered, so every rank's texts are
negatives for every image. Each rank then computes the rows of its own images against all
global texts and divides by ``m * B_local``; DDP's gradient *averaging* over W ranks turns
that into ``sum_r S_r / (m * B_local * W) = sum / (m * B_global)``, the single-process loss
on the concatenated batch, and the same gradients (tests/test_loss_distributed.py).

The logit parameters (t, b) belong to the model (`FlameModel.logit_scale / logit_bias`);
this module is stateless and takes them as arguments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INIT_LOGIT_SCALE = math.log(10.0)
INIT_LOGIT_BIAS = -10.0
MAX_LOGIT_SCALE = math.log(100.0)


class MultiPositiveSigmoidLoss(nn.Module):
    """``loss(image_emb [B,D], text_emb [B,m,D], logit_scale, logit_bias) -> scalar``.

    Embeddings are expected L2-normalised. `gather_texts=True` (default) all-gathers the text
    embeddings when torch.distributed is initialised with more than one rank; pass False to
    keep negatives local. The returned value is this rank's share, scaled so that the mean over
    ranks (what DDP applies to gradients) equals the global loss.
    """

    def __init__(self, gather_texts: bool = True):
        super().__init__()
        self.gather_texts = gather_texts

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        if text_emb.dim() == 2:  # [B, D]: one positive per image (plain SigLIP)
            text_emb = text_emb.unsqueeze(1)
        b, m, d = text_emb.shape
        if image_emb.shape != (b, d):
            raise ValueError(f"image_emb {tuple(image_emb.shape)} does not match text_emb {tuple(text_emb.shape)}")
        texts = text_emb.reshape(b * m, d).to(image_emb.dtype)
        offset = 0
        if self.gather_texts:
            from flame import distributed

            if distributed.world_size() > 1:
                texts = distributed.all_gather_constant(texts)  # [W*B*m, D], rank order
                offset = distributed.rank() * b * m
        logits = logit_scale.exp() * (image_emb @ texts.T) + logit_bias  # [B, W*B*m]
        labels = -torch.ones_like(logits)
        rows = torch.arange(b, device=logits.device).repeat_interleave(m)
        cols = offset + torch.arange(b * m, device=logits.device)
        labels[rows, cols] = 1.0
        return -F.logsigmoid(labels * logits).sum() / (m * b)


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
