"""The FLAME release (github MIV-XJTU/FLAME) on this project's side: its text side as a
manifest block, a safe reader for its PyTorch files, and `flame embed --import-release`.

The release embeds every training image's captions offline and writes one file per image,
`ROOT/{DIR}/{KEY}.pth`: a float16 tensor [11, 5120], L2-normalised rows in the order raw
caption (raw set, 1 facet), short recaption (short set, 3), long recaption (long set, 7),
computed by Mistral-Nemo-Instruct-2407, layer 39, with its packed "continue" positions.
DIR is the key's first 5 characters for CC3M and the part before the first `_` for
YFCC15M (the release's training reader uses both). The import copies those vectors into a
normal store, one store shard per input tar shard, bit-exact in fp16.

Every file is read with `torch.load(weights_only=True)`: a file that would need to run
code to unpickle (anything but tensors and plain containers) is refused, never executed.
The release records no fingerprint of its LLM's weights, so neither do we (`fingerprint`
is null): nothing can verify later that a local Mistral-Nemo is the one it used.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flame.data.captions import read_shard_captions
from flame.data.shards import ShardError, shard_name, tar_keys
from flame.errors import FlameError
from flame.prompts import PROMPT_SETS
from flame.store import EmbeddingStore, NonFiniteShard, StoreLock
from flame.units import human_bytes, human_time
from flame.weights import load_torch

RELEASE_LLM = "mistralai/Mistral-Nemo-Instruct-2407"
RELEASE_LAYER = 39  # 1-based decoder block: the output of block 39 of 40
RELEASE_DIM = 5120
RELEASE_ORIGIN = "FLAME release (github.com/MIV-XJTU/FLAME)"
# the rows of a release .pth file: prompt set -> where its caption comes from
RELEASE_SETS: dict[str, str] = {
    "raw": "txt (the shard's own caption)",
    "short": "release short recaption (MiniCPM-Llama3-V-2.5)",
    "long": "release long recaption (MiniCPM-Llama3-V-2.5)",
}
# how the release names the folder of a key's file
LAYOUTS: dict[str, Callable[[str], str]] = {
    "cc3m": lambda key: key[:5],
    "yfcc15m": lambda key: key.split("_")[0],
}
CHUNK = 256  # rows read before each write into the shard


def release_text_side(dim: int = RELEASE_DIM, llm: str = RELEASE_LLM, layer: list[int] | None = None) -> dict:
    """The text-side block (store manifest / model config) that describes the release's
    embeddings: LLM, layer, continue positions, its raw/short/long prompt sets in its row
    order. No LLM fingerprint is known for the release: it is recorded as null."""
    sets = [{**PROMPT_SETS[name].to_dict(), "source": source} for name, source in RELEASE_SETS.items()]
    return {
        "llm": {"spec": llm, "fingerprint": None},
        "layer": list(layer or [RELEASE_LAYER]),
        "positions": "continue",
        "prompt_sets": sets,
        "facets": [f"{s['name']}/{i}" for s in sets for i in range(len(s["facets"]))],
        "k": sum(len(s["facets"]) for s in sets),
        "dim": int(dim),
        "normalized": True,
    }


def release_manifest(dim: int, dtype: str) -> dict:
    return {
        "format": "flame-embeddings",
        "version": 1,
        "origin": RELEASE_ORIGIN,
        **release_text_side(dim),
        "dtype": dtype,
    }


def read_release_vectors(path: Path, k: int | None, dim: int | None) -> np.ndarray:
    """One release .pth -> a numpy [k, dim] array of its values (float16 as the release stores)."""
    import torch

    t = load_torch(path, "release embedding file")
    if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
        found = f"a {t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise FlameError(f"release embedding file {path}: expected a float tensor [11, D], found {found}")
    if (k is not None and t.shape[0] != k) or (dim is not None and t.shape[1] != dim):
        raise FlameError(f"release embedding file {path}: shape {list(t.shape)}, expected [{k}, {dim}]")
    if t.dtype in (torch.float16, torch.float32, torch.float64):  # as stored: the store's writer converts once
        return t.detach().numpy()
    return t.detach().to(torch.float32).numpy()  # bfloat16: numpy has no such type


# ---- import -------------------------------------------------------------------------------
@dataclass
class ImportJob:
    """What `flame embed --import-release` was asked to do (from its Config)."""

    root: Path
    shards: list[Path]
    out: Path
    layout: str = "auto"  # "auto" or a key of LAYOUTS
    dtype: str = "fp16"
    on_missing: str = "skip"  # or "error"
    overwrite: bool = False


@dataclass
class ImportStats:
    samples: int = 0
    done: int = 0
    missing: int = 0
    bytes: int = 0
    failed: list = field(default_factory=list)  # (shard name, reason)
    example_missing: str = ""


class Finder:
    """key -> the release file for it under ROOT (the first layout whose file exists)."""

    def __init__(self, root: Path, layout: str):
        self.root = root
        self.layouts = list(LAYOUTS.values()) if layout == "auto" else [LAYOUTS[layout]]

    def candidates(self, key: str) -> list[Path]:
        return list(dict.fromkeys(self.root / fn(key) / f"{key}.pth" for fn in self.layouts))

    def find(self, key: str) -> Path | None:
        return next((p for p in self.candidates(key) if p.is_file()), None)


def _probe_dim(shards: list[Path], finder: Finder) -> int:
    """D of the release files, from the first file found for the shards' keys."""
    example = None
    for path in shards:
        try:
            keys = tar_keys(path)
        except ShardError:  # reported when its turn comes
            continue
        for key in keys:
            found = finder.find(key)
            if found is not None:
                k, dim = read_release_vectors(found, None, None).shape
                if k != 11:
                    raise FlameError(f"release embedding file {found}: {k} rows, the release stores 11 per image")
                return int(dim)
            example = example or finder.candidates(key)[0]
    hint = f" (looked for e.g. {example})" if example else " (the shards hold no samples)"
    raise FlameError(f"no release embedding files under {finder.root} for the samples of the given shards{hint}")


def _import_shard(store: EmbeddingStore, name: str, path: Path, finder: Finder, job: ImportJob, stats: ImportStats,
                  bar) -> None:
    keys = read_shard_captions(path, ()).keys  # ShardError for an unreadable tar
    rows: list[tuple[str, Path]] = []
    for key in keys:
        found = finder.find(key)
        if found is None:
            looked = finder.candidates(key)[0]
            if job.on_missing == "error":
                raise FlameError(
                    f"shard {name}: no release embedding file for sample {key!r} ({looked} is missing); "
                    "--on-missing skip leaves such samples out"
                )
            stats.missing += 1
            stats.example_missing = stats.example_missing or str(looked)
            continue
        rows.append((key, found))
    writer = store.shard_writer(name, len(rows))
    try:
        for start in range(0, len(rows), CHUNK):
            part = rows[start : start + CHUNK]
            vectors = np.stack([read_release_vectors(p, store.k, store.dim) for _, p in part])
            writer.write(slice(start, start + len(part)), vectors)
            if bar is not None:
                bar.update(len(part))
        stats.bytes += writer.commit([key for key, _ in rows])
    except BaseException:
        writer.abort()
        raise
    stats.samples += len(rows)
    stats.done += 1


def run_import(job: ImportJob, notify: Callable[[str], None] | None = None) -> int:
    """`flame embed --import-release ROOT --data SHARDS --out STORE` (one process does it all:
    the caller runs it on rank 0 only). `notify` reports the lock's no-flock fallback."""
    if not job.root.is_dir():
        raise FlameError(f"--import-release {job.root}: not a folder")
    names = [shard_name(p) for p in job.shards]
    finder = Finder(job.root, job.layout)
    t0 = time.perf_counter()
    lock = StoreLock(job.out, notify=notify)
    try:
        if (job.out / "manifest.json").is_file() and not job.overwrite:
            dim = EmbeddingStore(job.out).dim  # a resumed import: the files were probed the first time
        else:
            dim = _probe_dim(job.shards, finder)
        store = EmbeddingStore.create(job.out, release_manifest(dim, job.dtype), overwrite=job.overwrite)
        store.clean_temporaries()
        todo = [(n, p) for n, p in zip(names, job.shards) if not store.is_complete(n)]
        stats = _import_all(store, todo, finder, job)
    finally:
        lock.release()
    missing_hint = f", e.g. {stats.example_missing}" if stats.example_missing else ""
    print(
        f"flame embed --import-release: {stats.samples:,} samples, shards {stats.done} done / "
        f"{len(job.shards) - len(todo)} skipped / {len(stats.failed)} failed, {stats.missing:,} samples missing "
        f"an embedding file ({job.on_missing}{missing_hint}), {human_bytes(stats.bytes)} written to {job.out} "
        f"in {human_time(time.perf_counter() - t0)}"
    )
    if stats.failed:
        listed = ", ".join(f"{n} ({r})" for n, r in stats.failed[:3]) + (" ..." if len(stats.failed) > 3 else "")
        raise FlameError(f"{len(stats.failed)} shard(s) failed: {listed}; rerun the same command to retry")
    return 0


def _import_all(store: EmbeddingStore, todo: list[tuple[str, Path]], finder: Finder, job: ImportJob) -> ImportStats:
    from flame.progress import progress

    stats = ImportStats()
    bar = progress(desc=f"import {len(todo)} shards", unit="img")
    try:
        for name, path in todo:
            try:
                _import_shard(store, name, path, finder, job, stats, bar)
            except (ShardError, NonFiniteShard) as e:  # an unreadable tar, NaN/inf in the files: the rest goes on
                stats.failed.append((name, str(e)))
                bar.write(f"flame embed: shard {name} failed: {e} (skipped; the other shards go on)", file=sys.stderr)
    finally:
        bar.close()
    return stats
