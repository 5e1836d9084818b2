"""What the parts of `flame bench gpu` share: the run's context (mode, device, time left, the
measured matmul ceiling), device timing and the matmul ceiling itself."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Context:
    """One `flame bench gpu` run: every part reads its sizes from `quick` and its device from here."""

    quick: bool
    device: torch.device
    root: Path  # a scratch folder, removed when the run ends
    deadline: float  # time.monotonic() after which no optional variant starts
    ceiling_tflops: float | None = None  # the measured dense matmul rate the MFU figures are against
    ceiling_dtype: str = ""
    figures: dict = field(default_factory=dict)  # the parts done so far, by name

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        """Seconds of the run's budget left."""
        return self.deadline - time.monotonic()

    def mfu(self, flops: float, seconds: float) -> float | None:
        """Model FLOPs per second as a share of the measured ceiling."""
        if not self.ceiling_tflops or seconds <= 0:
            return None
        return flops / seconds / (self.ceiling_tflops * 1e12)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Seconds per call of `fn` (device work included), over `repeats` calls."""
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def matmul_ceiling(device: torch.device, quick: bool) -> dict:
    """The dense matmul rate this device reaches on one large square product: bf16 8192^3 on CUDA
    (what the bf16 forward and training step are held against), fp32 on the CPU (512^3 in quick
    mode). The best of three rounds of products, after warm-up."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else (512 if quick else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    reps = 20 if cuda else 3
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    product = lambda: a @ b
    best = min(timed(product, device, reps) for _ in range(3))
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds_per_product": best,
            "tflops": 2 * n**3 / best / 1e12}


def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    """Give cached device memory back between parts (each sizes itself as if alone)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
