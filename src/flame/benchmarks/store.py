"""`flame bench store`: the embedding store against the released layout (one fp16 `.pth`
file per sample written with torch.save), on the same synthetic embeddings, in one run.

Figures: bytes per sample on disk (file sizes) for the fp16 store, the int8 store and
the release layout; the worst cosine between an int8-stored vector and its float
original; random-access read throughput as training reads: random batches of samples,
m=6 of the K=11 facets of each (FLAME.md section 5). The store gathers just those
vectors from its memory-mapped shards; the release layout runs `torch.load(path)` per
sample, as the released code does, and keeps m facets. Extras: `_full_rows` reads all
K facets (pure bandwidth: the store's gain is then only the per-file overhead),
`_full_rows_float32` also converts to float32 on the CPU (the same cost on both sides),
`_vs_weights_only_false` uses torch's faster, unsafe unpickler. Reads produce stored
values in host memory, ready for the GPU. The files are fresh, so both sides read from
the page cache: a cold disk with millions of files favours the store further. torch
runs single-threaded, like numpy, for a like-for-like comparison.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flame.benchmarks.base import BenchConfig, report
from flame.config import at_least, setting
from flame.errors import FlameError

DTYPES = ("fp16", "int8")


@dataclass
class Config(BenchConfig):
    """`flame bench store` settings."""

    samples: int = setting(1000, check=at_least(1), help="samples")
    dim: int = setting(5120, check=at_least(1), help="embedding size D (5120: Mistral-Nemo)")
    k: int = setting(11, check=at_least(1), help="embeddings per sample")
    shard_size: int = setting(500, check=at_least(1), help="samples per store shard")
    batch: int = setting(256, check=at_least(1), help="samples per random read batch")
    batches: int = setting(8, check=at_least(1), help="timed read batches per layout")
    workdir: Path | None = setting(None, shown="a temp dir", help="where to write the files")
    m: int = setting(6, check=at_least(1), help="facets read per sample, as training samples them")
    seed: int = setting(0, help="seed of the synthetic embeddings and the read order")

    def check(self) -> None:
        if self.m > self.k:
            raise FlameError(f"--m {self.m} is more than the --k {self.k} embeddings per sample")


def main(cfg: Config) -> int:
    return report("store", run(cfg), cfg.json)


def _manifest(k: int, dim: int, dtype: str) -> dict:
    return {
        "llm": {"spec": "synthetic", "fingerprint": "synthetic"},
        "layer": [0],
        "positions": "restart",
        "prompt_sets": [],
        "facets": [f"synthetic/{i}" for i in range(k)],
        "k": k,
        "dim": dim,
        "dtype": dtype,
        "normalized": True,
    }


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != ".lock")


def run(cfg: Config) -> dict:
    import torch

    # single-threaded like the numpy side: torch's intra-op threads only add sync cost to
    # these small copies (and on a busy machine they make the baseline look far worse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(dir=cfg.workdir, prefix="flame-bench-store-") as tmp:
            written = _write(Path(tmp), cfg)
            timings = _time_reads(_Readers(Path(tmp), cfg, written.names), cfg)
        return _figures(cfg, written, timings)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Written:
    names: list[str] = field(default_factory=list)  # the shards, in sample order
    sizes: dict[str, int] = field(default_factory=dict)  # layout -> bytes on disk
    cos_min: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DTYPES, 1.0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys((*DTYPES, "release"), 0.0))


def _write(root: Path, cfg: Config) -> _Written:
    """The same synthetic vectors as an fp16 store, an int8 store and one fp16 .pth per sample."""
    import torch

    from flame.store import EmbeddingStore

    rng = np.random.default_rng(cfg.seed)
    stores = {dt: EmbeddingStore.create(root / dt, _manifest(cfg.k, cfg.dim, dt)) for dt in DTYPES}
    release = root / "release"
    release.mkdir()
    w = _Written()
    for start in range(0, cfg.samples, cfg.shard_size):
        stop = min(start + cfg.shard_size, cfg.samples)
        v = rng.standard_normal((stop - start, cfg.k, cfg.dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
        name = f"shard-{len(w.names):05d}"
        w.names.append(name)
        keys = [f"{i:09d}" for i in range(start, stop)]
        for dt, store in stores.items():
            t = time.perf_counter()
            store.write_shard(name, keys, v)
            w.seconds[dt] += time.perf_counter() - t
            back = store.get(name, slice(None))
            cos = (back * v).sum(-1) / np.linalg.norm(back, axis=-1)
            w.cos_min[dt] = min(w.cos_min[dt], float(cos.min()))
        t = time.perf_counter()
        half = torch.from_numpy(v).to(torch.float16)
        for i, key in enumerate(keys):
            torch.save(half[i].clone(), release / f"{key}.pth")
        w.seconds["release"] += time.perf_counter() - t
        del v, half
    w.sizes = {layout: _dir_bytes(root / layout) for layout in (*DTYPES, "release")}
    return w


class _Readers:
    """Random-access reads of each layout, as training reads: m of the K facets of each sample."""

    def __init__(self, root: Path, cfg: Config, names: list[str]):
        from flame.store import EmbeddingStore

        self.release, self.names, self.k = root / "release", names, cfg.k
        self.stores = {dt: EmbeddingStore(root / dt) for dt in DTYPES}
        self.shard_of = np.arange(cfg.samples) // cfg.shard_size
        self.row_of = np.arange(cfg.samples) % cfg.shard_size
        self.facet_rng = np.random.default_rng(cfg.seed + 2)

    def pick(self, count: int, m: int) -> np.ndarray:
        return np.argsort(self.facet_rng.random((count, self.k)), axis=1)[:, :m]

    def store(self, dt: str, idx: np.ndarray, m: int | None = None, as_float: bool = False) -> list:
        s, parts = self.stores[dt], []
        for sh in np.unique(self.shard_of[idx]):
            rows = np.sort(self.row_of[idx[self.shard_of[idx] == sh]])
            if as_float:
                parts.append(s.get(self.names[sh], rows))
                continue
            sel = rows if m is None else (rows[:, None], self.pick(len(rows), m))
            parts.append(s.array(self.names[sh])[sel])  # a memory-map gather: only these vectors are read
            if dt == "int8":
                parts.append(s.scales(self.names[sh])[sel])
        return parts

    def released(self, idx: np.ndarray, m: int | None = None, **load_kw):
        import torch

        tensors = [torch.load(self.release / f"{i:09d}.pth", **load_kw) for i in idx.tolist()]
        if m is not None:  # the whole file is read and unpickled, then m facets are kept
            tensors = [t[f] for t, f in zip(tensors, torch.from_numpy(self.pick(len(idx), m)))]
        return torch.stack(tensors)

    def released_f32(self, idx: np.ndarray):
        return self.released(idx).float()


def _time_reads(r: _Readers, cfg: Config) -> dict[str, float]:
    """Read throughput (samples/s) per layout and read kind, over the same random batches."""
    bsz, m = min(cfg.batch, cfg.samples), cfg.m
    order = np.random.default_rng(cfg.seed + 1)
    batches = [order.choice(cfg.samples, size=bsz, replace=False) for _ in range(cfg.batches + 1)]
    timings: dict[str, float] = {}
    for b, idx in enumerate(batches):  # interleaved, so machine noise hits every layout alike
        runs = (
            ("release", r.released, (idx, m), {}),  # torch.load(path), as the released code calls it
            ("release_unsafe", r.released, (idx, m), {"weights_only": False}),
            ("fp16", r.store, ("fp16", idx, m), {}),
            ("int8", r.store, ("int8", idx, m), {}),
            ("release_full", r.released, (idx,), {}),
            ("fp16_full", r.store, ("fp16", idx), {}),
            ("int8_full", r.store, ("int8", idx), {}),
            ("release_f32", r.released_f32, (idx,), {}),
            ("fp16_f32", r.store, ("fp16", idx), {"as_float": True}),
        )
        for key, fn, fargs, fkw in runs:
            t = time.perf_counter()
            fn(*fargs, **fkw)
            if b:  # batch 0 warms up
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
    return {key: cfg.batches * bsz / max(t, 1e-9) for key, t in timings.items()}


def _figures(cfg: Config, w: _Written, read: dict[str, float]) -> dict:
    import torch

    n, sizes = cfg.samples, w.sizes
    return {
        "samples": n,
        "k": cfg.k,
        "dim": cfg.dim,
        "bytes_per_sample_fp16": sizes["fp16"] / n,
        "bytes_per_sample_int8": sizes["int8"] / n,
        "bytes_per_sample_release": sizes["release"] / n,
        "int8_vs_release": sizes["int8"] / sizes["release"],
        "fp16_vs_release": sizes["fp16"] / sizes["release"],
        "files_per_sample_release": 1.0,
        "files_per_sample_fp16": 2 * len(w.names) / n,
        "read_facets_per_sample": cfg.m,
        "read_samples_per_s_fp16": read["fp16"],
        "read_samples_per_s_int8": read["int8"],
        "read_samples_per_s_release": read["release"],
        "read_speedup": read["fp16"] / read["release"],
        "read_speedup_int8": read["int8"] / read["release"],
        "read_speedup_vs_weights_only_false": read["fp16"] / read["release_unsafe"],
        "read_speedup_full_rows": read["fp16_full"] / read["release_full"],
        "read_speedup_full_rows_int8": read["int8_full"] / read["release_full"],
        "read_speedup_full_rows_float32": read["fp16_f32"] / read["release_f32"],
        "write_speedup_fp16": w.seconds["release"] / max(w.seconds["fp16"], 1e-9),
        "int8_cosine_min": w.cos_min["int8"],
        "fp16_cosine_min": w.cos_min["fp16"],
        "torch_threads": torch.get_num_threads(),
    }
