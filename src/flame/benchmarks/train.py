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

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flame.benchmarks.base import BenchConfig, report
from flame.config import at_least, setting
from flame.errors import FlameError


@dataclass
class Config(BenchConfig):
    """`flame bench train` settings."""

    batch_size: int = setting(64, check=at_least(1), help="samples per step")
    image_size: int = setting(64, check=at_least(1), help="tower input size")
    source_size: int = setting(160, check=at_least(1), help="stored JPEG size")
    dim: int = setting(576, check=at_least(1), help="text dim D (576 = SmolLM2-135M)")
    k: int = setting(11, check=at_least(1), help="facets per sample in the store")
    positives: int = setting(6, aliases=("-m",), check=at_least(1), help="facets sampled per image (m)")
    proj_hidden: int = setting(576, check=at_least(1), help="projector hidden H")
    rounds: int = setting(7, check=at_least(1), help="interleaved timing rounds")
    workers: int = setting(2, check=at_least(0), help="data-loader processes")
    samples: int = setting(768, check=at_least(1), help="samples in the generated shards")

    def check(self) -> None:
        if self.positives > self.k:
            raise FlameError(f"--positives {self.positives} is more than the --k {self.k} facets per sample")


def main(cfg: Config) -> int:
    return report("train", run(cfg), cfg.json)


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


def _loader_rate(cfg: Config) -> tuple[float, dict]:
    """-> (samples/s of `flame train`'s DataLoader alone, one batch of it)."""
    from flame.data.images import StreamConfig, make_loader
    from flame.data.synthetic import write_shards

    B = cfg.batch_size
    with tempfile.TemporaryDirectory(prefix="flame-bench-train-") as tmp:
        root = Path(tmp)
        shards = write_shards(root / "shards", cfg.samples, shard_size=max(1, cfg.samples // 4),
                              size=cfg.source_size, seed=0)
        store = _store(root, shards, cfg.k, cfg.dim)
        stream = StreamConfig(shards=[str(s) for s in shards], store=str(store.path), image_size=cfg.image_size,
                              batch_size=B, m=cfg.positives, eligible=list(range(cfg.k)))
        loader = iter(make_loader(stream, cfg.workers))
        batch = next(loader)  # warm: workers started, first batch decoded
        n_batches = max(4, cfg.samples // B)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(loader)
        rate = n_batches * B / (time.perf_counter() - t0)
        del loader
    return rate, batch


def _model(cfg: Config, pool_first: bool):
    from flame.model import FlameModel
    from flame.vision import TowerConfig

    torch.manual_seed(0)
    return FlameModel(TowerConfig("vit-tiny", embed_dim=cfg.dim, proj_hidden=cfg.proj_hidden, pool_first=pool_first,
                                  image_size=cfg.image_size))


def _bare_step(cfg: Config, images: torch.Tensor):
    """The tower alone on pre-normalised images, a trivial loss, AdamW over the tower."""
    from flame.data.images import normalize_images

    model = _model(cfg, False)
    x = normalize_images(images, model.mean, model.std)
    target = torch.nn.functional.normalize(torch.randn(cfg.dim), dim=0)
    opt = torch.optim.AdamW(model.visual.parameters(), lr=5e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5)

    def step():
        emb = model.visual(x)
        (emb @ target).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _full_step(cfg: Config, images: torch.Tensor, texts16: torch.Tensor, pool_first: bool):
    """What `flame train` runs per micro-batch once the batch is in memory."""
    from flame.data.images import normalize_images
    from flame.loss import MultiPositiveSigmoidLoss
    from flame.train import lr_lambda, param_groups

    model = _model(cfg, pool_first)
    opt = torch.optim.AdamW(param_groups(model, 0.5), lr=5e-4, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, 10_000, 0.0))
    loss_fn = MultiPositiveSigmoidLoss()

    def step():
        x = normalize_images(images, model.mean, model.std)
        out = model(x)
        loss = loss_fn(out["image"], texts16.float(), out["logit_scale"], out["logit_bias"])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.clamp_()

    return step


def run(cfg: Config) -> dict:
    torch.manual_seed(0)
    loader_rate, batch = _loader_rate(cfg)
    images, texts16 = batch["images"], batch["texts"]
    steps = {"bare": _bare_step(cfg, images), "full": _full_step(cfg, images, texts16, False),
             "pool": _full_step(cfg, images, texts16, True)}
    for fn in steps.values():  # warm-up (allocator, oneDNN kernels)
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(cfg.rounds):
        for name, fn in steps.items():
            times[name].append(_time(fn))
    bare, full, pool = times["bare"], times["full"], times["pool"]
    t_bare, t_full, t_pool = statistics.median(bare), statistics.median(full), statistics.median(pool)
    step_rate = cfg.batch_size / t_full
    return {
        "step_overhead": statistics.median([f / b for f, b in zip(full, bare)]),
        "loader_samples_per_s": loader_rate,
        "step_samples_per_s": step_rate,
        "pool_first_speedup": statistics.median([f / p for f, p in zip(full, pool)]),
        "loader_vs_step": loader_rate / step_rate,
        "bare_step_ms": 1000 * t_bare,
        "full_step_ms": 1000 * t_full,
        "pool_first_step_ms": 1000 * t_pool,
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "dim": cfg.dim,
        "k": cfg.k,
        "m": cfg.positives,
        "proj_hidden": cfg.proj_hidden,
        "loader_workers": cfg.workers,
        "torch_threads": torch.get_num_threads(),
        "rounds": cfg.rounds,
    }
