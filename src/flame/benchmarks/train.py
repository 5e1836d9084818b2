"""`flame bench train`: training-step overhead, data-loader throughput, pool-first speed-up.

All in one process, side by side, interleaved round by round (medians), on a tiny ViT:

- bare step: the same image tower (trunk + per-token projector + mean pool + L2 norm) on the
  same pre-normalised batch, a trivial loss (dot product with a fixed random vector),
  backward, AdamW step over the tower's parameters, zero_grad.
- full FLAME step: what `flame train` runs per micro-batch once a batch is in memory: uint8 ->
  normalised images, fp16 texts [B,m,D] -> float, tower forward, multi-positive sigmoid loss
  against the B*m texts with the logit scale/bias, backward, AdamW step over all parameters
  (weight-decay groups), LR scheduler step, logit-scale clamp, zero_grad.
  step_overhead = full time / bare time.
- loader: `flame train`'s DataLoader (webdataset shards joined with a K x D fp16 store,
  JPEG decode, random resized crop, m-of-K facet sampling, batching) with --workers processes,
  alone; loader_samples_per_s vs step_samples_per_s (B / full step time).
- pool_first_speedup: full step time with the per-token projector / with pool-then-project.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64, help="tower input size (default 64)")
    p.add_argument("--source-size", type=int, default=160, help="stored JPEG size (default 160)")
    p.add_argument("--dim", type=int, default=576, help="text dim D (default 576 = SmolLM2-135M)")
    p.add_argument("--k", type=int, default=11, help="facets per sample in the store (default 11)")
    p.add_argument("-m", "--positives", type=int, default=6)
    p.add_argument("--proj-hidden", type=int, default=576, help="projector hidden H (default 576)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    p.add_argument("--workers", type=int, default=2, help="data-loader processes (default 2)")
    p.add_argument("--samples", type=int, default=768, help="samples in the generated shards")


def _store(root: Path, shards: list[Path], k: int, dim: int):
    from flame.data.images import tar_keys
    from flame.data.shards import shard_name
    from flame.store import EmbeddingStore

    rng = np.random.default_rng(0)
    manifest = {"llm": {"spec": "bench", "fingerprint": "bench"}, "layer": -1, "positions": "restart",
                "prompt_sets": [{"name": "long"}], "facets": [f"long/{i}" for i in range(k)], "k": k, "dim": dim,
                "dtype": "fp16", "normalized": True}
    store = EmbeddingStore.create(root / "store", manifest)
    for p in shards:
        keys = tar_keys(p)
        v = rng.standard_normal((len(keys), k, dim)).astype(np.float32)
        store.write_shard(shard_name(p), keys, v / np.linalg.norm(v, axis=-1, keepdims=True))
    return store


def _time(fn, n: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def run(args: argparse.Namespace) -> dict:
    from flame.data.images import StreamConfig, make_loader, normalize_images
    from flame.data.synthetic import write_shards
    from flame.loss import MultiPositiveSigmoidLoss
    from flame.model import FlameModel
    from flame.train import lr_lambda, param_groups
    from flame.vision import TowerConfig

    torch.manual_seed(0)
    B, D, m = args.batch_size, args.dim, args.positives
    with tempfile.TemporaryDirectory(prefix="flame-bench-train-") as tmp:
        root = Path(tmp)
        shards = write_shards(root / "shards", args.samples, shard_size=max(1, args.samples // 4),
                              size=args.source_size, seed=0)
        store = _store(root, shards, args.k, D)
        stream = StreamConfig(shards=[str(s) for s in shards], store=str(store.path), image_size=args.image_size,
                              batch_size=B, m=m, eligible=list(range(args.k)))
        loader = iter(make_loader(stream, args.workers))
        batch = next(loader)  # warm: workers started, first batch decoded
        n_batches = max(4, args.samples // B)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(loader)
        loader_rate = n_batches * B / (time.perf_counter() - t0)
        del loader

    def build(pool_first: bool):
        torch.manual_seed(0)
        model = FlameModel(TowerConfig("vit-tiny", embed_dim=D, proj_hidden=args.proj_hidden, pool_first=pool_first,
                                       image_size=args.image_size))
        return model

    images_u8, texts16 = batch["images"], batch["texts"]
    model = build(False)
    images = normalize_images(images_u8, model.mean, model.std)
    target = torch.nn.functional.normalize(torch.randn(D), dim=0)

    bare_model = build(False)
    bare_opt = torch.optim.AdamW(bare_model.visual.parameters(), lr=5e-4, betas=(0.9, 0.95), eps=1e-8,
                                 weight_decay=0.5)

    def bare_step():
        emb = bare_model.visual(images)
        (emb @ target).mean().backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    def full_step_for(model):
        opt = torch.optim.AdamW(param_groups(model, 0.5), lr=5e-4, betas=(0.9, 0.95), eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, 10_000, 0.0))
        loss_fn = MultiPositiveSigmoidLoss()

        def step():
            x = normalize_images(images_u8, model.mean, model.std)
            out = model(x)
            loss = loss_fn(out["image"], texts16.float(), out["logit_scale"], out["logit_bias"])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            model.clamp_()

        return step

    full_step = full_step_for(model)
    pool_step = full_step_for(build(True))
    for fn in (bare_step, full_step, pool_step):  # warm-up (allocator, oneDNN kernels)
        fn()
        fn()
    bare, full, pool = [], [], []
    for _ in range(args.rounds):
        bare.append(_time(bare_step))
        full.append(_time(full_step))
        pool.append(_time(pool_step))
    ratios = [f / b for f, b in zip(full, bare)]
    pool_ratios = [f / p for f, p in zip(full, pool)]
    t_bare, t_full, t_pool = statistics.median(bare), statistics.median(full), statistics.median(pool)
    step_rate = B / t_full
    return {
        "step_overhead": statistics.median(ratios),
        "loader_samples_per_s": loader_rate,
        "step_samples_per_s": step_rate,
        "pool_first_speedup": statistics.median(pool_ratios),
        "loader_vs_step": loader_rate / step_rate,
        "bare_step_ms": 1000 * t_bare,
        "full_step_ms": 1000 * t_full,
        "pool_first_step_ms": 1000 * t_pool,
        "batch_size": B,
        "image_size": args.image_size,
        "dim": D,
        "k": args.k,
        "m": m,
        "proj_hidden": args.proj_hidden,
        "loader_workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
    }
