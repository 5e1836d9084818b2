"""FLAME's multi-positive sigmoid loss (FLAME.md section 5) and SigLIP, its one-positive case.

For n images and their P positive text embeddings each, among the N*P texts of the global
batch, the logits are ``exp(t) * img @ txt.T + b`` over all image-text pairs, the label is +1
for an image's own P texts and -1 for every other text, and

    loss = -sum(logsigmoid(label * logit)) / (P * N)

With P = 1 this is exactly the SigLIP loss (open_clip's `SigLipLoss`). Each image's term needs
only the (constant) texts, so the loss is a sum over images (`decomposes`): every rank scores
its own images against all global texts and divides by ``P * b_local``; DDP's gradient
averaging over W ranks turns that into the single-process loss on the concatenated batch, and
the same gradients (tests/unit/test_loss_distributed.py, tests/unit/test_losses.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flame.loss.base import FlameLoss


def sigmoid_sum(image_emb: torch.Tensor, texts: torch.Tensor, first: int, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """-sum(logsigmoid(label * logit)) of images [n, D] against every text [N, P, D], where image i
    is image `first + i` of the N (its positives are texts[first + i])."""
    n_all, p, d = texts.shape
    n = image_emb.shape[0]
    flat = texts.reshape(n_all * p, d).to(image_emb.dtype)
    logits = logit_scale.exp() * (image_emb @ flat.T) + logit_bias  # [n, N*P]
    labels = -torch.ones_like(logits)
    rows = torch.arange(n, device=logits.device).repeat_interleave(p)
    cols = first * p + torch.arange(n * p, device=logits.device)
    labels[rows, cols] = 1.0
    return -F.logsigmoid(labels * logits).sum()


class MultiPositiveSigmoidLoss(FlameLoss):
    """``loss(image_emb [B,D], text_emb [B,m,D], logit_scale, logit_bias) -> scalar``, all m positives.

    `gather_texts=False` keeps negatives local (the old keyword of `gather`)."""

    name = "mp-sigmoid"
    decomposes = True

    def __init__(self, gather_texts: bool = True):
        super().__init__(gather=gather_texts)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
        texts = self.pick(text_emb)
        self.check(image_emb, texts)
        rank, _ = self.world()
        b = image_emb.shape[0]
        return self.rows(image_emb, self.gather_texts(texts), rank * b, b, logit_scale, logit_bias)

    def rows(self, image_emb: torch.Tensor, texts: torch.Tensor, first: int, count: int,
             logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
        """The terms of images [n, D] (images first .. first+n-1 of the global batch, whose
        positives are `texts` [N, P, D], every text of it) divided by P * `count`, the images of
        the share they belong to: the loss of a part of the images (accumulation)."""
        return sigmoid_sum(image_emb, texts, first, logit_scale, logit_bias) / (texts.shape[1] * count)


class SigLipLoss(MultiPositiveSigmoidLoss):
    """SigLIP: one positive per image, the first of the m drawn."""

    name = "siglip"
    positives = 1
