"""`flame bench gpu` parts about the machine itself: the environment (versions, the GPU, which SDPA
kernels exist, the measured matmul ceiling) and the process group (NCCL with flame's gloo side
channel, at world size 1)."""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from flame.benchmarks.gpu_common import Context, matmul_ceiling, sync

# import name -> distribution name, for the versions recorded
PACKAGES = {"transformers": "transformers", "open_clip": "open_clip_torch", "tokenizers": "tokenizers",
            "webdataset": "webdataset", "timm": "timm", "numpy": "numpy", "PIL": "pillow",
            "safetensors": "safetensors", "torchvision": "torchvision", "triton": "triton"}


def _version(module: str, dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except ImportError:
        return None


def _flame_version() -> dict:
    import flame

    out = {"version": flame.__version__, "path": str(Path(flame.__file__).parent)}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=out["path"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def versions() -> dict:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    nccl = None
    if torch.cuda.is_available():
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError, TypeError):
            nccl = None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": cudnn, "nccl": nccl, **{m: _version(m, d) for m, d in PACKAGES.items()},
            "flame": _flame_version()}


def gpu_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    p = torch.cuda.get_device_properties(device)
    try:
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before the argument: it reported native support only
        bf16 = torch.cuda.is_bf16_supported()
    return {"name": p.name, "memory_gib": p.total_memory / 2**30, "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count, "bf16_native": bool(bf16), "count": torch.cuda.device_count(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def _sdpa_backends() -> dict:
    """name -> SDPBackend member, those this torch knows."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return {}
    names = {"flash": "FLASH_ATTENTION", "mem_efficient": "EFFICIENT_ATTENTION", "math": "MATH",
             "cudnn": "CUDNN_ATTENTION"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def sdpa_probe(device: torch.device) -> dict:
    """Which SDPA kernels run here, each forced alone on a small bf16 (CPU: fp32) problem, without
    a mask and with a boolean [B,1,T,T] mask like the facet pass's (flash takes no mask)."""
    backends = _sdpa_backends()
    if not backends:
        return {"skipped": "torch.nn.attention.sdpa_kernel is not in this torch"}
    from torch.nn.attention import sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(2, 8, 128, 64, device=device, dtype=dtype) for _ in range(3))
    mask = torch.ones(128, 128, dtype=torch.bool, device=device).tril()[None, None].expand(2, 1, 128, 128)
    out = {}
    for name, backend in backends.items():
        row = {}
        for case, m in (("no_mask", None), ("bool_mask", mask)):
            try:
                with sdpa_kernel([backend]):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
                sync(device)
                row[case] = True
            except RuntimeError as e:
                row[case] = False
                row.setdefault("why", str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__)
        out[name] = row
    if device.type == "cuda":
        flags = {"flash": "flash_sdp_enabled", "mem_efficient": "mem_efficient_sdp_enabled",
                 "math": "math_sdp_enabled", "cudnn": "cudnn_sdp_enabled"}
        for name, fn in flags.items():
            if name in out and hasattr(torch.backends.cuda, fn):
                out[name]["enabled"] = bool(getattr(torch.backends.cuda, fn)())
    return out


def environment(ctx: Context) -> dict:
    """Versions, the machine, the SDPA kernels and the matmul ceiling (kept in `ctx` for MFU)."""
    ceiling = matmul_ceiling(ctx.device, ctx.quick)
    ctx.ceiling_tflops, ctx.ceiling_dtype = ceiling["tflops"], ceiling["dtype"]
    return {"versions": versions(), "host": platform.node(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(ctx.device),
            "gpu": gpu_info(ctx.device), "sdpa": sdpa_probe(ctx.device), "matmul_ceiling": ceiling}


# ---- the process group ---------------------------------------------------------------------------
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _round_trips(tensor: torch.Tensor, group, n: int) -> float:
    """Microseconds per all_reduce of `tensor` over `group`, the value checked."""
    import torch.distributed as tdist

    tdist.all_reduce(tensor, group=group)  # warm
    sync(tensor.device)
    t = time.perf_counter()
    for _ in range(n):
        tensor.fill_(1)
        tdist.all_reduce(tensor, group=group)
    sync(tensor.device)
    us = (time.perf_counter() - t) / n * 1e6
    if float(tensor.sum()) != tensor.numel():  # world size 1: the sum of one rank's ones
        raise RuntimeError(f"all_reduce returned {tensor.tolist()} for ones")
    return us


def process_group(ctx: Context) -> dict:
    """flame.distributed's process group at world size 1, as torchrun would set it up: nccl with
    the gloo group beside it on CUDA (gloo alone on the CPU); one all_reduce on each, timed."""
    from flame import distributed

    saved = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(distributed.free_port()))
    out: dict = {}
    try:
        t = time.perf_counter()
        distributed.start_group(ctx.device, datetime.timedelta(seconds=120))
        import torch.distributed as tdist

        out["init_seconds"] = time.perf_counter() - t
        out["backend"] = str(tdist.get_backend())
        control = distributed.control_group()
        out["side_channel"] = "gloo" if control is not None else None
        n = 20 if ctx.quick else 200
        if ctx.cuda:
            out["nccl_all_reduce_us"] = _round_trips(torch.zeros(1024, device=ctx.device), None, n)
            out["gloo_side_channel_all_reduce_us"] = _round_trips(torch.zeros(1, dtype=torch.int32), control, n)
        else:
            out["nccl"] = {"skipped": "no CUDA"}
            out["gloo_all_reduce_us"] = _round_trips(torch.zeros(1, dtype=torch.int32), None, n)
        out["ok"] = True
    finally:
        distributed.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out
