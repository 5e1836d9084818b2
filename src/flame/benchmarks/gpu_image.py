"""`flame bench gpu` parts on the image side: the ViT-B/16 training step at batch 384 with D 5120
(per-token projector), with and without activation checkpointing and torch.compile; and
`flame train`'s data loader on generated photo-sized JPEG shards with the workers one GPU of a
typical node gets."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import torch

from flame.benchmarks.gpu_common import Context, free, peak_memory_mib, reset_peak, sync, timed

# dense bf16 tensor-core rates from the vendors' datasheets (TFLOP/s), to state MFU the usual way too
DATASHEET_BF16 = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "A100": 312.0}
M, K = 6, 11  # positives drawn per image, facets stored per caption (the paper's)


def datasheet_tflops(ctx: Context) -> float | None:
    if not ctx.cuda:
        return None
    name = torch.cuda.get_device_name(ctx.device)
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def random_store(folder: Path, shards: list[Path], k: int, dim: int, seed: int = 0):
    """An fp16 store of random unit vectors for the keys of `shards` (what `flame train` reads)."""
    from flame.data.images import tar_keys
    from flame.data.shards import shard_name
    from flame.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    manifest = {"llm": {"spec": "bench", "fingerprint": "bench"}, "layer": -1, "positions": "restart",
                "prompt_sets": [{"name": "long"}], "facets": [f"long/{i}" for i in range(k)], "k": k, "dim": dim,
                "dtype": "fp16", "normalized": True}
    store = EmbeddingStore.create(folder, manifest)
    for p in shards:
        keys = tar_keys(p)
        v = rng.standard_normal((len(keys), k, dim)).astype(np.float32)
        store.write_shard(shard_name(p), keys, v / np.linalg.norm(v, axis=-1, keepdims=True))
    return store


# ---- the training step ------------------------------------------------------------------------
def _sizes(ctx: Context) -> dict:
    if ctx.quick:
        return {"tower": "vit-tiny", "image_size": 32, "batch": 8, "dim": 64, "proj_hidden": 64, "warm": 1, "steps": 2}
    return {"tower": "vit-b-16", "image_size": 224, "batch": 384, "dim": 5120, "proj_hidden": None, "warm": 3,
            "steps": 10}


def _batch(ctx: Context, s: dict) -> dict:
    """A loader-shaped batch in host memory (pinned on CUDA): uint8 images, fp16 unit texts."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (s["batch"], 3, s["image_size"], s["image_size"]), dtype=torch.uint8, generator=g)
    texts = torch.nn.functional.normalize(torch.randn(s["batch"], M, s["dim"], generator=g), dim=-1).half()
    if ctx.cuda:
        images, texts = images.pin_memory(), texts.pin_memory()
    return {"images": images, "texts": texts}


def _model(s: dict, device: torch.device, checkpointing: bool):
    from flame.model import FlameModel
    from flame.vision import TowerConfig

    torch.manual_seed(0)
    model = FlameModel(TowerConfig(s["tower"], embed_dim=s["dim"], proj_hidden=s["proj_hidden"],
                                   image_size=s["image_size"]))
    model.set_grad_checkpointing(checkpointing)
    return model.to(device).train()


def make_step(ctx: Context, model, batch: dict, compiled: bool):
    """One `flame train` step on `batch` as the trainer runs it once the batch is loaded: copy to the
    device, normalise (mean/std on the device once), forward under bf16 autocast (CUDA), the FLAME
    loss against the fp16 texts, backward, the non-finite guard's device flag, AdamW (fused where
    torch has it) skipping on that flag, the schedule, zero_grad, the logit-scale clamp."""
    from flame.data.images import normalize_images
    from flame.loss import DEFAULT_LOSS, make_loss
    from flame.train.guard import NonFiniteGuard, step_unless
    from flame.train.optim import adamw, param_groups, schedule

    device = ctx.device
    opt = adamw(param_groups(model, 0.5), 5e-4, (0.9, 0.95), 1e-8)
    sched = schedule(opt, 2000, 100_000, 5e-4, 0.0)
    loss_fn, guard = make_loss(DEFAULT_LOSS), NonFiniteGuard(20, device)
    forward = torch.compile(model) if compiled else model
    norm = [torch.tensor(v, dtype=torch.float32, device=device) for v in (model.mean, model.std)]

    def step():
        images = batch["images"].to(device, non_blocking=True)
        texts = batch["texts"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.cuda):
            out = forward(normalize_images(images, *norm))
            loss = loss_fn(out["image"], texts, out["logit_scale"], out["logit_bias"])
        loss.backward()
        step_unless(opt, guard.flag(loss, model))
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.clamp_()

    return step


def step_flops(ctx: Context, s: dict, batch: dict) -> float:
    """FLOPs of one step's forward and backward (torch's FlopCounterMode; no checkpoint recompute)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(s, ctx.device, False)
    step = make_step(ctx, model, batch, False)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = float(counter.get_total_flops())
    del model, step
    free(ctx.device)
    return flops


def _variant(ctx: Context, s: dict, batch: dict, flops: float, checkpointing: bool, compiled: bool) -> dict:
    model = _model(s, ctx.device, checkpointing)
    step = make_step(ctx, model, batch, compiled)
    reset_peak(ctx.device)
    t = time.perf_counter()
    step()
    sync(ctx.device)
    first = time.perf_counter() - t  # with compile: the compilation
    for _ in range(s["warm"] - 1):
        step()
    seconds = timed(step, ctx.device, s["steps"])
    out = {"step_ms": seconds * 1000, "images_per_s": s["batch"] / seconds, "mfu": ctx.mfu(flops, seconds),
           "first_step_s": first, "peak_memory_mib": peak_memory_mib(ctx.device)}
    sheet = datasheet_tflops(ctx)
    if sheet:
        out["mfu_datasheet"] = flops / seconds / (sheet * 1e12)
    del model, step
    if compiled and hasattr(torch, "_dynamo"):
        torch._dynamo.reset()  # the compiled graphs go with the model
    free(ctx.device)
    return out


def training_step(ctx: Context) -> dict:
    """The step without and with activation checkpointing, eager and compiled (CUDA only: on the
    CPU torch.compile needs a C++ toolchain and minutes), each on a fresh model."""
    s = _sizes(ctx)
    batch = _batch(ctx, s)
    flops = step_flops(ctx, s, batch)
    out: dict = {"tower": s["tower"], "image_size": s["image_size"], "batch": s["batch"], "dim": s["dim"],
                 "m": M, "proj_hidden": s["proj_hidden"] or max(s["dim"], 4096), "flops_per_step": flops,
                 "timed_steps": s["steps"], "autocast_bf16": ctx.cuda}
    for compiled in (False, True):
        for checkpointing in (False, True):
            name = ("compiled" if compiled else "eager") + ("_checkpointing" if checkpointing else "")
            if compiled and not ctx.cuda:
                out[name] = {"skipped": "no CUDA (torch.compile is measured on the GPU only)"}
            elif compiled and not hasattr(torch, "compile"):
                out[name] = {"skipped": "this torch has no torch.compile"}
            elif compiled and ctx.left() < 150:
                out[name] = {"skipped": f"time budget: {ctx.left():.0f} s left"}
            else:
                try:
                    out[name] = _variant(ctx, s, batch, flops, checkpointing, compiled)
                except Exception as e:  # one variant failing (out of memory, a compile error) keeps the others
                    out[name] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
                    free(ctx.device)
    runs = {k: v for k, v in out.items() if isinstance(v, dict) and "images_per_s" in v}
    if runs:
        best = max(runs, key=lambda k: runs[k]["images_per_s"])
        out["fastest"] = {"variant": best, **runs[best]}
    return out


# ---- the data loader --------------------------------------------------------------------------
def _photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG that decodes like a photo: smooth colour regions and sensor-like noise, quality 90
    (500x375: about 54 KiB, in the range of web photos of that size)."""
    from PIL import Image

    coarse = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def photo_shards(folder: Path, shards: int, per: int, size: tuple[int, int], unique: int) -> tuple[list[Path], float]:
    """`shards` tars of `per` JPEG samples each; `unique` distinct photos reused under new keys (the
    decode cost is the same, the generation is not paid per sample). -> (paths, mean JPEG bytes)"""
    import webdataset as wds

    rng = np.random.default_rng(0)
    photos = [_photo(rng, *size) for _ in range(unique)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"photos-{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per):
                sink.write({"__key__": f"{s:04d}{i:06d}", "jpg": photos[(s * per + i) % unique]})
        paths.append(path)
    return paths, float(np.mean([len(p) for p in photos]))


def gpu_workers(ctx: Context) -> tuple[int, int]:
    """(loader workers of one GPU on this node: the CPUs over the local GPUs, local GPUs)."""
    gpus = torch.cuda.device_count() if ctx.cuda else 1
    workers = max(1, (os.cpu_count() or 1) // max(1, gpus))
    return (min(2, workers) if ctx.quick else workers), gpus


def loader(ctx: Context) -> dict:
    """`flame train`'s DataLoader (tar reading, JPEG decode, random resized crop, the store join,
    m-of-K facets, batching; pinned on CUDA) alone, on photo-sized JPEGs, after every worker's first
    batch: images/s in all and per worker."""
    from flame.data.images import StreamConfig, make_loader

    s = _sizes(ctx)
    workers, gpus = gpu_workers(ctx)
    size = (160, 120) if ctx.quick else (500, 375)
    n_shards, per = (4, 12) if ctx.quick else (max(32, 2 * workers), 48)
    shards, jpeg_bytes = photo_shards(ctx.root / "photos", n_shards, per, size, 8 if ctx.quick else 64)
    store = random_store(ctx.root / "photo-store", shards, K, s["dim"])
    stream = StreamConfig(shards=[str(p) for p in shards], store=str(store.path), image_size=s["image_size"],
                          batch_size=s["batch"], m=M, eligible=list(range(K)))
    it = iter(make_loader(stream, workers, pin_memory=ctx.cuda))
    t = time.perf_counter()
    for _ in range(max(2, workers)):  # every worker started and its first batch made
        batch = next(it)
    warm = time.perf_counter() - t
    n = 4 if ctx.quick else max(24, 3 * workers)
    t = time.perf_counter()
    for _ in range(n):
        batch = next(it)
    seconds = time.perf_counter() - t
    del it
    rate = n * s["batch"] / seconds
    return {"workers": workers, "local_gpus": gpus, "cpu_count": os.cpu_count(), "photo_size": list(size),
            "image_size": s["image_size"], "batch": s["batch"], "dim": s["dim"], "k": K, "m": M,
            "mean_jpeg_kib": jpeg_bytes / 1024,
            "batches_timed": n, "warm_seconds": warm, "images_per_s": rate, "images_per_s_per_worker": rate / workers,
            "batch_shape": list(batch["images"].shape)}
