"""Memory of `flame eval`'s retrieval and linear probe at a given size, in a fresh process each:
the peak RSS the computation adds on top of its inputs (VmHWM after the inputs are made, with the
peak reset through /proc/self/clear_refs). Run it against any checkout through PYTHONPATH:

    PYTHONPATH=src .venv/bin/python benchmarks/eval_memory.py retrieval 100000 1000 576
    PYTHONPATH=src .venv/bin/python benchmarks/eval_memory.py probe 50000 100 768

retrieval N_TEXT N_IMAGE D: random caption/image vectors, `retrieval_metrics` (in place where it
can). probe N CLASSES D: N training and N/4 test features; the new probe reads them from .npy
memory maps (what the image cache holds), 8a825a2's L-BFGS probe from tensors (5 iterations per
fit: its memory does not depend on the count). The figure is anonymous + file pages touched.
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


def retrieval(n_text: int, n_img: int, dim: int) -> dict:
    from flame.evaluate.metrics import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_img, dim, generator=g)
    owner = torch.arange(n_text) % n_img
    texts = images[owner] + 2.0 * torch.randn(n_text, dim, generator=g)
    known = inspect.signature(retrieval_metrics).parameters
    extra = {k: v for k, v in (("device", "cpu"), ("overwrite", True)) if k in known}
    base = reset_peak()
    t0 = time.perf_counter()
    retrieval_metrics(images, texts, owner, **extra)
    return {"inputs_mib": (texts.numel() + images.numel()) * 4 / 2**20, "added_mib": (status("VmHWM") - base) / 2**20,
            "seconds": time.perf_counter() - t0}


def probe(n: int, classes: int, dim: int) -> dict:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, dim, generator=g)
    ytr, yte = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (n // 4,), generator=g)
    tmp = Path(tempfile.mkdtemp())
    for name, y in (("train", ytr), ("test", yte)):
        np.save(tmp / f"{name}.npy", (centers[y] + torch.randn(len(y), dim, generator=g)).numpy())
    try:
        from flame.evaluate.probe import clip_benchmark_probe
    except ImportError:  # 8a825a2: the L-BFGS probe on tensors
        from flame.evaluate.metrics import linear_probe

        xtr, xte = torch.from_numpy(np.load(tmp / "train.npy")), torch.from_numpy(np.load(tmp / "test.npy"))
        base = reset_peak()
        t0 = time.perf_counter()
        linear_probe(xtr, ytr, xte, yte, max_iter=5)
    else:
        xtr, xte = np.load(tmp / "train.npy", mmap_mode="r"), np.load(tmp / "test.npy", mmap_mode="r")
        base = reset_peak()
        t0 = time.perf_counter()
        clip_benchmark_probe(xtr, ytr.numpy(), xte, yte.numpy(), epochs=1, device="cpu")
    return {"inputs_mib": (n + n // 4) * dim * 4 / 2**20, "added_mib": (status("VmHWM") - base) / 2**20,
            "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    torch.set_num_threads(2)
    what, *sizes = sys.argv[1:]
    fn = {"retrieval": retrieval, "probe": probe}[what]
    print(json.dumps({"what": what, "sizes": [int(s) for s in sizes], **fn(*(int(s) for s in sizes))}))
