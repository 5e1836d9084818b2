"""What every FLAME loss shares: the call, the positives it uses, and the global batch.

A loss is called as ``loss(image_emb [b, D], text_emb [b, m, D], logit_scale, logit_bias)`` with
L2-normalised embeddings, the m positives of each image drawn by the data stream, t (scale =
exp(t)) and b. Under torch.distributed every rank's texts are negatives for every image (the
global batch of N = W * b images): the text side is all-gathered as a constant (it comes from
the frozen LLM and has no gradient). The value returned is this rank's share, scaled so that
the mean over ranks -- what DDP applies to gradients -- is the loss of the global batch, and so
are its gradients.

`positives`: how many of the m drawn positives a loss uses, the first ones (None = all m; 1 for
the one-positive losses, whose positive is then the first draw, a facet drawn uniformly from the
eligible ones). `decomposes`: whether the loss is a sum of one term per image scored against
constant texts, which `rows` computes for any subset of the images; then gradient accumulation
needs nothing but the texts of the whole accumulated batch (`flame.train.accumulate`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class FlameLoss(nn.Module):
    name = ""
    positives: int | None = None
    decomposes = False

    def __init__(self, gather: bool = True):
        """`gather=False` keeps the negatives of this rank only (for references and tests)."""
        super().__init__()
        self.gather = gather

    def pick(self, text_emb: torch.Tensor) -> torch.Tensor:
        """[b, m, D] (or [b, D] = one positive) -> the [b, P, D] positives this loss uses."""
        if text_emb.dim() == 2:
            text_emb = text_emb.unsqueeze(1)
        return text_emb if self.positives is None else text_emb[:, : self.positives]

    def check(self, image_emb: torch.Tensor, texts: torch.Tensor) -> None:
        b, _, d = texts.shape
        if image_emb.shape != (b, d):
            raise ValueError(f"image_emb {tuple(image_emb.shape)} does not match text_emb {tuple(texts.shape)}")

    def world(self) -> tuple[int, int]:
        """(rank, world size) of the negatives: (0, 1) when not gathering."""
        if not self.gather:
            return 0, 1
        from flame import distributed

        return distributed.rank(), distributed.world_size()

    def gather_texts(self, texts: torch.Tensor) -> torch.Tensor:
        """[b, P, D] of this rank -> [W*b, P, D] of every rank, in rank order (no gradient), in at
        least float32. They cross ranks in their own dtype (the store's fp16: half the bytes of fp32,
        and the conversion after is exact)."""
        return self.start_gather_texts(texts)()

    def start_gather_texts(self, texts: torch.Tensor) -> Callable[[], torch.Tensor]:
        """`gather_texts` issued now; calling the result waits for it. The texts are known before the
        forward, so their transfer overlaps it (`flame.train.accumulate.decomposed`)."""
        wide = torch.promote_types(texts.dtype, torch.float32)
        if self.world()[1] == 1:
            return lambda: texts.to(wide)
        from flame import distributed

        gathering = distributed.start_gather_constant(texts)
        return lambda: gathering.wait().to(wide)
