"""`flame bench gpu`'s check of `flame train --resume --deterministic` on the device: a run of
8 steps against one resumed from its step-4 checkpoint in another run folder (as a requeued job
finds it: `--resume` resolving the latest checkpoint), weights compared at step 8. In full mode
each run is the command in a fresh process, as a user starts it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import torch

from flame.benchmarks.gpu_common import Context
from flame.benchmarks.gpu_image import random_store
from flame.benchmarks.gpu_text import quietly

STEPS, HALF = 8, 4


def _settings(ctx: Context, data, store, out) -> dict:
    return {"data": [str(data)], "embeddings": str(store), "out": str(out), "tower": "vit-tiny", "image_size": 32,
            "proj_hidden": 32, "batch_size": 8, "workers": 1 if ctx.quick else 2, "steps": STEPS,
            "save_every": HALF, "keep": 0, "warmup": 2, "log_every": 1, "seed": 5,
            "device": str(ctx.device) if ctx.cuda else "cpu"}


def _flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return out


def _train(ctx: Context, settings: dict, resume: bool) -> float:
    """`flame train --deterministic [--resume]`: the command itself in a fresh process (full mode: its
    deterministic set-up is what runs before cuBLAS starts), or in this process (quick mode: no
    second interpreter to start; deterministic mode is undone afterwards)."""
    t = time.perf_counter()
    if ctx.quick:
        from flame.config import validate
        from flame.train import TrainConfig, main

        cfg = validate(TrainConfig(**settings, deterministic=True, progress=False, tensorboard=False,
                                   resume="latest" if resume else None))
        code, said = quietly(main, cfg)
    else:
        argv = [sys.executable, "-m", "flame", "train", *_flags(settings), "--deterministic", "--no-progress",
                "--no-tensorboard", *(["--resume"] if resume else [])]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        code, said = proc.returncode, proc.stdout + proc.stderr
    if code != 0:
        raise RuntimeError(f"flame train exited {code}: {said.strip()[-500:]}")
    return time.perf_counter() - t


def _max_diff(a, b) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if x.keys() != y.keys():
        raise RuntimeError("the two checkpoints hold different tensors")
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def train_resume(ctx: Context) -> dict:
    """Run A trains 8 steps (checkpoints at 4 and 8); run B starts from a copy of A's checkpoint 4
    and its settings and is resumed with `--resume`; B's step 8 must equal A's."""
    from flame.data.synthetic import write_shards
    from flame.runfolder import TRAIN_CONFIG, checkpoint_name

    root = ctx.root / "resume"
    shards = write_shards(root / "shards", 64, shard_size=16, size=40, seed=3)
    store = random_store(root / "store", shards, 3, 16)
    a, b = root / "run-a", root / "run-b"
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        whole = _train(ctx, _settings(ctx, root / "shards", store.path, a), False)
        b.mkdir()
        shutil.copytree(a / checkpoint_name(HALF), b / checkpoint_name(HALF))
        shutil.copy(a / TRAIN_CONFIG, b / TRAIN_CONFIG)
        resumed = _train(ctx, _settings(ctx, root / "shards", store.path, b), True)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    records = [json.loads(line) for line in (b / "log.jsonl").read_text().splitlines() if line.strip()]
    diff = _max_diff(a / checkpoint_name(STEPS), b / checkpoint_name(STEPS))
    return {"device": str(ctx.device), "ran_in": "this process" if ctx.quick else "a subprocess each",
            "steps": STEPS, "resumed_at": HALF,
            "first_logged_step_after_resume": records[0]["step"] if records else None,
            "max_abs_diff": diff, "bit_exact": diff == 0.0, "match": diff <= 1e-6,
            "trained_change": _max_diff(a / checkpoint_name(HALF), a / checkpoint_name(STEPS)),
            "seconds_whole_run": whole, "seconds_resumed_run": resumed}
