"""The multi-positive softmax (InfoNCE) loss of the FLAME release (its `--mp-nce`) and CLIP's
loss, its one-positive case.

For N images with P positive texts each (text (i, k) is image i's k-th positive) and the
logits ``s * <img, txt>``, s = exp(t):

- image -> text: for every positive slot k, each image picks its own text among the N texts of
  slot k (a softmax over the N images' k-th positives); cross-entropy averaged over the N*P
  (image, slot) pairs;
- text -> image: each of the N*P texts picks its image among the N images; averaged over N*P;
- loss = (image->text + text->image) / 2.

With P = 1 this is exactly CLIP's symmetric loss (open_clip's `ClipLoss`). The bias b cancels in
a softmax; it joins the graph with a zero gradient so that DDP sees every parameter used.

The text->image direction needs every image of the global batch, with its gradient: under
torch.distributed the images are gathered with `flame.distributed.all_gather_with_grad`. Each
rank scores its own images (image->text) and its own texts (text->image) against the global
batch and divides by ``P * b_local``, so the mean over ranks is the global loss. The loss is not
a sum of per-image terms (`decomposes = False`): accumulating it exactly needs every image
embedding of the accumulated batch first (`flame.train.accumulate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flame.loss.base import FlameLoss


class MultiPositiveSoftmaxLoss(FlameLoss):
    """``loss(image_emb [B,D], text_emb [B,m,D], logit_scale, logit_bias) -> scalar``, all m positives."""

    name = "mp-softmax"

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
        texts = self.pick(text_emb).to(image_emb.dtype)
        self.check(image_emb, texts)
        rank, world = self.world()
        b, p, _ = texts.shape
        all_texts, all_images = self.gather_texts(texts), image_emb
        if world > 1:
            from flame import distributed

            all_images = distributed.all_gather_with_grad(image_emb)
        scale = logit_scale.exp()
        own = rank * b + torch.arange(b, device=image_emb.device)
        # [P, b, N]: slot k of own images against slot k of every image
        i2t = scale * torch.einsum("bd,nkd->kbn", image_emb, all_texts)
        # [b, P, N]: own texts against every image
        t2i = scale * torch.einsum("bkd,nd->bkn", texts, all_images)
        n = all_images.shape[0]
        loss_i2t = F.cross_entropy(i2t.reshape(p * b, n), own.repeat(p), reduction="sum")
        loss_t2i = F.cross_entropy(t2i.reshape(b * p, n), own.repeat_interleave(p), reduction="sum")
        return (loss_i2t + loss_t2i) / (2 * p * b) + 0.0 * logit_bias


class ClipLoss(MultiPositiveSoftmaxLoss):
    """CLIP's symmetric InfoNCE: one positive per image, the first of the m drawn."""

    name = "clip"
    positives = 1
