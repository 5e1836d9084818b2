"""One optimizer step of `flame train`'s Trainer on a tiny set, with the gradients it is about to
apply and the loss it logs: what the accumulation tests compare between `--batch-size B --accum N`
and `--batch-size N*B` (one process here; the torchrun worker of test_accumulation uses it too)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_TOWER = {"tower": "vit-tiny", "image_size": 32, "proj_hidden": 32}


def make_trainer(root: Path, out: str, batch_size: int, accum: int, loss: str | None = None, **settings):
    """A Trainer over `root`'s shards and store (`support.training.make_set`), ready for
    `train_step` (its console and meter built as `fit` builds them). `loss=None`: the default
    (the only one on a checkout without --loss)."""
    from flame.train import TrainConfig, plan, validate
    from flame.train.logger import Console, Meter
    from flame.train.loop import Trainer

    given = {"loss": loss} if loss else {}
    cfg = validate(TrainConfig(
        data=[str(root / "shards")], embeddings=str(root / "store"), out=str(root / out), batch_size=batch_size,
        accum=accum, steps=1, warmup=0, workers=0, device="cpu", seed=0, tensorboard=False, progress=False,
        **TINY_TOWER, **given, **settings))
    trainer = Trainer(cfg, plan(cfg), torch.device("cpu"))
    trainer.console = Console(False, False, 0, 0)
    trainer.meter = Meter(0, trainer.device)
    return trainer


def one_step(trainer, batches) -> tuple[float, dict[str, torch.Tensor]]:
    """Run `trainer.train_step` on the iterator `batches`; -> (the loss it logs, every parameter's
    gradient as the optimizer step found it)."""
    grads: dict[str, torch.Tensor] = {}

    def capture(optimizer, args, kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    hook = trainer.optimizers[0].register_step_pre_hook(capture)
    skipped = trainer.train_step(batches)
    hook.remove()
    assert not skipped
    return trainer.record(trainer.state.step)["loss"], grads  # what log.jsonl gets


def join(batches: list[dict]) -> dict:
    """Micro-batches -> one batch of all their samples, in order."""
    return {"images": torch.cat([b["images"] for b in batches]), "texts": torch.cat([b["texts"] for b in batches]),
            "keys": [k for b in batches for k in b["keys"]], "state": batches[-1]["state"]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (gradients of one tensor differ in scale by tensor)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
