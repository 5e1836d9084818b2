"""`flame embed --dry-run`: count the samples, project the store's size and the time on this
hardware from a timed sample of captions; nothing is written."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from flame import distributed
from flame.data.shards import ShardError, shard_name
from flame.embed.config import Config
from flame.embed.encode import load_encoders
from flame.embed.plan import Plan, accept_legacy_fingerprint, load_tables, manifest
from flame.embed.report import Stats
from flame.embed.rows import shard_rows
from flame.prompts import clean_caption
from flame.store import DTYPES, EmbeddingStore, manifest_difference
from flame.units import human_bytes, human_time

TIMED = 32  # distinct captions timed per prompt set


@dataclass
class Count:
    stats: Stats = field(default_factory=Stats)
    rows: int = 0
    key_bytes: int = 0
    unique: list[int] = field(default_factory=list)  # distinct captions per source
    sample: list[list[str]] = field(default_factory=list)  # the captions to time, per source


def dry_run(cfg: Config, plan: Plan) -> int:
    t0 = time.perf_counter()
    count = _count(cfg, plan)
    device = str(distributed.resolve_device(cfg.device))
    model, encoders, fingerprint = load_encoders(cfg, plan, device)
    from flame.llm import legacy_llm_fingerprint

    ours = manifest(cfg, plan, encoders, fingerprint)
    ours = accept_legacy_fingerprint(ours, plan.out, legacy_llm_fingerprint(model))
    k, dim = ours["k"], ours["dim"]
    per_row = k * dim * np.dtype(DTYPES[cfg.dtype]).itemsize + (4 * k if cfg.dtype == "int8" else 0)
    size = count.rows * per_row + count.key_bytes + 128 * 2 * len(plan.shards)
    seconds = _projected_seconds(encoders, count, device)
    print(
        f"flame embed --dry-run: {len(plan.shards)} shards, {count.rows:,} samples to store "
        f"({count.stats.missing:,} missing a caption, {count.stats.empty:,} empty captions, "
        f"{len(count.stats.failed)} unreadable shards), {k} facets x {dim} dims {cfg.dtype}"
    )
    print(f"  projected store size: {human_bytes(size)} ({per_row:,} bytes per sample){_existing(plan, ours)}")
    print(
        f"  projected time on {device}: {human_time(seconds)} for {sum(count.unique):,} unique captions "
        f"(timed on {sum(map(len, count.sample))} captions; N processes/GPUs divide it by about N); "
        f"dry run took {human_time(time.perf_counter() - t0)}"
    )
    return 0


def _count(cfg: Config, plan: Plan) -> Count:
    """Read every shard's captions, counting every problem instead of stopping at the first."""
    tables = load_tables(plan, cfg.key_field)
    count = Count(unique=[0] * len(plan.sources), sample=[[] for _ in plan.sources])
    on_empty = "skip" if cfg.on_empty == "skip" else "embed"
    for path in plan.shards:
        name = shard_name(path)
        try:
            keys, captions = shard_rows(name, path, plan, tables, count.stats, on_missing="skip", on_empty=on_empty)
        except ShardError as e:
            count.stats.failed.append((name, str(e)))
            print(f"flame embed: shard {name} would fail: {e}", file=sys.stderr)
            continue
        count.rows += len(keys)
        count.key_bytes += len(json.dumps(keys, ensure_ascii=False)) + 1
        for i, caps in enumerate(captions):
            u = list(dict.fromkeys(clean_caption(c) for c in caps))
            count.unique[i] += len(u)
            count.sample[i].extend(u[: TIMED - len(count.sample[i])])
    return count


def _projected_seconds(encoders, count: Count, device: str) -> float:
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    seconds = 0.0
    for enc, caps, n in zip(encoders, count.sample, count.unique):
        if not caps:
            continue
        enc.encode(caps[:2])  # warm-up
        sync()
        t = time.perf_counter()
        enc.encode(caps)
        sync()
        seconds += (time.perf_counter() - t) / len(caps) * n
    return seconds


def _existing(plan: Plan, ours: dict) -> str:
    """What the run would do with a store already at --out."""
    if not (plan.out / "manifest.json").is_file():
        return ""
    store = EmbeddingStore(plan.out)
    diff = manifest_difference(store.manifest, ours)
    if diff is not None:
        return f"; existing store has different settings ({diff}): needs --overwrite"
    done = sum(store.is_complete(shard_name(p)) for p in plan.shards)
    return f"; existing store: {done} of {len(plan.shards)} shards complete (would be skipped)"
