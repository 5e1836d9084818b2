"""The gradients of one optimizer step over `accum` micro-batches: exactly the gradients of one
step on the accum-times larger batch (up to float summation order), on one rank or many.

FLAME's text side is constant (stored vectors of a frozen LLM), so the loss of the whole
accumulated batch of every rank needs, beside the images, only texts that are known before the
first forward. Two ways, by what the loss needs (`FlameLoss.decomposes`):

- `decomposed` (mp-sigmoid, siglip: a sum of one term per image): each micro-batch's images are
  scored against the texts of the whole accumulated batch of every rank (all-gathered once, the
  transfer in flight during the first forward), divided by the images of the rank's accumulated
  batch. The micro-batch terms add up to the full batch's loss and gradients; nothing is computed
  twice. Also the path of accum = 1.
- `cached` (mp-softmax, clip: text->image softmaxes over every image): a pre-pass without
  gradient embeds every micro-batch's images; the loss of the whole accumulated batch is computed
  once on those embeddings (as leaves, gathered across ranks with gradient), which gives its
  gradient with respect to every embedding and to t and b; then each micro-batch is embedded
  again with gradient and back-propagates its slice of that gradient (the gradient-cache
  method; open_clip's --accum-freq substitutes each chunk into the cached features the same
  way). t and b get their gradient once, on the last micro-batch. Costs one forward more.

`per_micro` is the plain way (each micro-batch its own loss, averaged): exact for accum = 1,
and what the demo's CLIP baseline keeps, whose text tower is trained.

Each returns this rank's share of the step's loss (the mean over ranks is the full batch's).
"""

from __future__ import annotations

import torch

from flame import distributed as dist


def exact(trainer, micro: list[dict]) -> torch.Tensor:
    """The full batch's gradients, by the way the trainer's loss needs."""
    if trainer.loss_fn.decomposes:
        return decomposed(trainer, micro)
    return per_micro(trainer, micro) if len(micro) == 1 else cached(trainer, micro)


def per_micro(trainer, micro: list[dict]) -> torch.Tensor:
    """Each micro-batch its own `trainer.loss` (its texts only), the step's loss their mean."""
    total = torch.zeros((), device=trainer.device)
    for i, batch in enumerate(micro):
        with dist.no_sync(trainer.ddp, i < len(micro) - 1):
            loss = trainer.loss(batch)
            (loss / len(micro)).backward()
        total = total + loss.detach().float()
    return total / len(micro)


def decomposed(trainer, micro: list[dict]) -> torch.Tensor:
    """The texts' all-gather is issued before the first forward and waited for after it, so the
    transfer (on many GPUs the largest of the step: every rank's m stored vectors of D) overlaps
    the image tower's forward."""
    loss_fn = trainer.loss_fn
    local = [loss_fn.pick(trainer.texts(b)) for b in micro]
    gathered = loss_fn.start_gather_texts(torch.cat(local))  # [W*n, P, D] once waited for
    texts = None
    n = sum(len(b["texts"]) for b in micro)  # this rank's images
    first = loss_fn.world()[0] * n
    total = torch.zeros((), device=trainer.device)
    for i, batch in enumerate(micro):
        with dist.no_sync(trainer.ddp, i < len(micro) - 1):
            with trainer.autocast():
                out = trainer.ddp(trainer.images(batch))
                loss_fn.check(out["image"], local[i])
                texts = gathered() if texts is None else texts
                share = loss_fn.rows(out["image"], texts, first, n, out["logit_scale"], out["logit_bias"])
            share.backward()
        total = total + share.detach().float()
        first += len(batch["texts"])
    return total


def cached(trainer, micro: list[dict]) -> torch.Tensor:
    model = trainer.model
    with torch.no_grad(), trainer.autocast():
        embs = [model(trainer.images(b))["image"].float() for b in micro]
    leaf = torch.cat(embs).requires_grad_()
    t = model.logit_scale.detach().clone().requires_grad_()
    b = model.logit_bias.detach().clone().requires_grad_()
    share = trainer.loss_fn(leaf, torch.cat([trainer.texts(x) for x in micro]), t, b)
    share.backward()
    grads = leaf.grad.split([len(e) for e in embs])
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        with dist.no_sync(trainer.ddp, not last):
            with trainer.autocast():
                out = trainer.ddp(trainer.images(batch))
            surrogate = (out["image"].float() * grads[i]).sum()
            if last:
                surrogate = surrogate + out["logit_scale"] * t.grad + out["logit_bias"] * b.grad
            surrogate.backward()
    return share.detach().float()
