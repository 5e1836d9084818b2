"""`flame bench gpu`: one prepared run that checks the whole GPU path and writes its figures.

Parts, in order (each in its own module; every part's figures or its error are kept, and the JSON
is rewritten after each one, so a run stopped by a timeout keeps what it measured):

- environment    versions, the GPU, the SDPA kernels that run, the measured matmul ceiling
- process_group  NCCL with flame's gloo side channel at world size 1 (gloo alone on a CPU)
- train_resume   `flame train --deterministic` for 8 steps against one resumed at step 4
- embed          `flame embed` on the device against a CPU fp32 run of the same captions
- facet_pass     the packed facet pass on a random Mistral-Nemo-shaped model: packed vs separate,
                 the attention kernel, tokens/s and MFU for the raw, short and long sets
- loader         `flame train`'s data loader on photo-sized JPEG shards, the workers of one GPU
- training_step  ViT-B/16 at batch 384, D 5120: images/s, MFU, peak memory; checkpointing and
                 torch.compile on and off

`--quick` shrinks every size so the whole run takes seconds on a CPU (the suite runs it); parts
that need CUDA say so ("skipped": why). `goals` holds the issue's targets against what was
measured ("not measured" where the run could not measure them).
"""

from __future__ import annotations

import datetime
import platform
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from flame.benchmarks import gpu_env, gpu_image, gpu_runs, gpu_text
from flame.benchmarks.base import BenchConfig, print_table, write_json
from flame.benchmarks.gpu_common import Context, free
from flame.config import at_least, setting
from flame.errors import FlameError

PARTS = {
    "environment": gpu_env.environment,
    "process_group": gpu_env.process_group,
    "train_resume": gpu_runs.train_resume,
    "embed": gpu_text.embed_end_to_end,
    "facet_pass": gpu_text.facet_pass,
    "loader": gpu_image.loader,
    "training_step": gpu_image.training_step,
}
GOALS = {"facet_forward_mfu_long": 0.60, "training_step_mfu": 0.40, "loader_over_step": 1.2}


@dataclass
class Config(BenchConfig):
    """`flame bench gpu` settings."""

    quick: bool = setting(False, help="tiny sizes everywhere, seconds in all, on a CPU too (CUDA-only parts "
                                      "are skipped with the reason)")
    device: str | None = setting(None, shown="cuda if available, else cpu", help="cpu, cuda, cuda:1 ...")
    budget: float = setting(480.0, check=at_least(1), metavar="SECONDS",
                            help="time for the whole run: the optional torch.compile variants start only with "
                                 "enough of it left")
    parts: str = setting("all", help=f"comma list of the parts to run: all or some of {', '.join(PARTS)}")

    def check(self) -> None:
        unknown = [p for p in self.chosen() if p not in PARTS]
        if unknown:
            raise FlameError(f"--parts: unknown part {unknown[0]!r} (known: {', '.join(PARTS)})")

    def chosen(self) -> list[str]:
        names = [p.strip() for p in self.parts.split(",") if p.strip()]
        return list(PARTS) if names in ([], ["all"]) else names


def _device(cfg: Config) -> torch.device:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlameError("--device cuda: no CUDA device is available")
    if device.type == "cpu" and not cfg.quick:
        raise FlameError("flame bench gpu needs a CUDA device for its full sizes; on a CPU run it with --quick")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _run_part(ctx: Context, name: str) -> dict:
    t = time.perf_counter()
    try:
        figures = PARTS[name](ctx)
    except Exception as e:  # a failing part is recorded and the next one runs
        figures = {"error": f"{type(e).__name__}: {str(e).strip()[:500]}",
                   "traceback": traceback.format_exc().strip().splitlines()[-6:]}
    free(ctx.device)
    figures["seconds"] = time.perf_counter() - t
    return figures


def _value(parts: dict, *path):
    node = parts
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, int | float) and not isinstance(node, bool) else None


def goals(parts: dict, ctx: Context) -> dict:
    """The issue's GPU goals against this run's figures; in quick mode they are not measured."""
    step = _value(parts, "training_step", "fastest", "images_per_s")
    loader = _value(parts, "loader", "images_per_s")
    values = {"facet_forward_mfu_long": _value(parts, "facet_pass", "long", "default", "forward_mfu"),
              "training_step_mfu": _value(parts, "training_step", "fastest", "mfu"),
              "loader_over_step": loader / step if loader and step else None}
    out = {}
    for name, target in GOALS.items():
        value = values[name]
        if value is None or not ctx.cuda or ctx.quick:
            why = "quick mode (tiny sizes)" if ctx.quick else "no CUDA" if not ctx.cuda else "its part did not run"
            out[name] = {"target": target, "value": value, "met": "not measured", "why": why}
        else:
            out[name] = {"target": target, "value": value, "met": value >= target}
    return out


def run(cfg: Config, on_part=None) -> dict:
    """Every chosen part in order; -> the report (`on_part(report)` after each part)."""
    device = _device(cfg)
    start = time.monotonic()
    report: dict = {"bench": "flame bench gpu", "mode": "quick" if cfg.quick else "full", "device": str(device),
                    "host": platform.node(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "parts": {}}
    root = Path(tempfile.mkdtemp(prefix="flame-bench-gpu-"))
    ctx = Context(quick=cfg.quick, device=device, root=root, deadline=start + cfg.budget)
    threads = torch.get_num_threads()
    if cfg.quick and not ctx.cuda:  # tiny sizes gain nothing from threads, which stall on a busy machine
        torch.set_num_threads(1)
    try:
        for name in cfg.chosen():
            if name != "environment" and ctx.ceiling_tflops is None and "environment" not in cfg.chosen():
                gpu_env.environment(ctx)  # the ceiling every MFU figure needs
            report["parts"][name] = _run_part(ctx, name)
            ctx.figures = report["parts"]
            report["goals"] = goals(report["parts"], ctx)
            report["wall_seconds"] = time.monotonic() - start
            if on_part:
                on_part(report)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)
    return report


def summary(report: dict) -> dict:
    """The figures worth a glance, flat, for the console table."""
    p = report["parts"]
    rows = {"mode": report["mode"], "device": report["device"]}
    rows["matmul ceiling TFLOP/s"] = _value(p, "environment", "matmul_ceiling", "tflops")
    for name in ("raw", "short", "long"):
        rows[f"facet {name} forward MFU"] = _value(p, "facet_pass", name, "default", "forward_mfu")
        rows[f"facet {name} packed-vs-separate max rel"] = _value(p, "facet_pass", name, "packed_vs_separate",
                                                                  "max_rel")
    cos = _value(p, "embed", "min_cosine")
    rows["embed 1 - min cosine vs CPU fp32"] = None if cos is None else 1 - cos
    rows["resume max abs diff"] = _value(p, "train_resume", "max_abs_diff")
    rows["step images/s (fastest)"] = _value(p, "training_step", "fastest", "images_per_s")
    rows["step MFU (fastest)"] = _value(p, "training_step", "fastest", "mfu")
    rows["loader images/s"] = _value(p, "loader", "images_per_s")
    for name, part in p.items():
        rows[f"{name}"] = "error: " + part["error"] if "error" in part else f"ok ({part['seconds']:.1f} s)"
    rows["wall seconds"] = report.get("wall_seconds")
    return {k: ("n/a" if v is None else v) for k, v in rows.items()}


def main(cfg: Config) -> int:
    save = (lambda report: write_json(cfg.json, report)) if cfg.json else None
    report = run(cfg, on_part=save)
    print_table("flame bench gpu", summary(report))
    if cfg.json:
        print(f"wrote {cfg.json}")
    failed = [name for name, part in report["parts"].items() if "error" in part]
    if failed:
        raise FlameError(f"flame bench gpu: {len(failed)} part(s) failed: {', '.join(failed)} (errors in the report)")
    return 0
