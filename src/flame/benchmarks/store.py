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

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=1000, help="samples (default 1000)")
    parser.add_argument("--dim", type=int, default=5120, help="embedding size D (default 5120, Mistral-Nemo)")
    parser.add_argument("--k", type=int, default=11, help="embeddings per sample (default 11)")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per store shard (default 500)")
    parser.add_argument("--batch", type=int, default=256, help="samples per random read batch (default 256)")
    parser.add_argument("--batches", type=int, default=8, help="timed read batches per layout (default 8)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    parser.add_argument("--m", type=int, default=6, help="facets read per sample, as training samples them (default 6)")
    parser.add_argument("--seed", type=int, default=0)


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


def run(args: argparse.Namespace) -> dict:
    import torch

    # single-threaded like the numpy side: torch's intra-op threads only add sync cost to
    # these small copies (and on a busy machine they make the baseline look far worse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    import torch

    from flame.store import EmbeddingStore

    n, k, dim = args.samples, args.k, args.dim
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="flame-bench-store-") as tmp:
        root = Path(tmp)
        stores = {dt: EmbeddingStore.create(root / dt, _manifest(k, dim, dt)) for dt in ("fp16", "int8")}
        release = root / "release"
        release.mkdir()
        names, cos_min = [], {"fp16": 1.0, "int8": 1.0}
        t_write = {"fp16": 0.0, "int8": 0.0, "release": 0.0}
        for start in range(0, n, args.shard_size):
            stop = min(start + args.shard_size, n)
            v = rng.standard_normal((stop - start, k, dim), dtype=np.float32)
            v /= np.linalg.norm(v, axis=-1, keepdims=True)
            name = f"shard-{len(names):05d}"
            names.append(name)
            keys = [f"{i:09d}" for i in range(start, stop)]
            for dt, store in stores.items():
                t = time.perf_counter()
                store.write_shard(name, keys, v)
                t_write[dt] += time.perf_counter() - t
                back = store.get(name, slice(None))
                cos = (back * v).sum(-1) / np.linalg.norm(back, axis=-1)
                cos_min[dt] = min(cos_min[dt], float(cos.min()))
            t = time.perf_counter()
            half = torch.from_numpy(v).to(torch.float16)
            for i, key in enumerate(keys):
                torch.save(half[i].clone(), release / f"{key}.pth")
            t_write["release"] += time.perf_counter() - t
            del v, half

        sizes = {dt: _dir_bytes(root / dt) for dt in stores}
        sizes["release"] = _dir_bytes(release)
        shard_of = np.arange(n) // args.shard_size
        row_of = np.arange(n) % args.shard_size
        readers = {dt: EmbeddingStore(root / dt) for dt in stores}

        bsz = min(args.batch, n)
        facet_rng = np.random.default_rng(args.seed + 2)

        def pick(count: int, m: int) -> np.ndarray:
            return np.argsort(facet_rng.random((count, k)), axis=1)[:, :m]

        def read_store(dt: str, idx: np.ndarray, m: int | None = None, as_float: bool = False):
            s, parts = readers[dt], []
            for sh in np.unique(shard_of[idx]):
                rows = np.sort(row_of[idx[shard_of[idx] == sh]])
                if as_float:
                    parts.append(s.get(names[sh], rows))
                    continue
                sel = rows if m is None else (rows[:, None], pick(len(rows), m))
                parts.append(s.array(names[sh])[sel])  # a memory-map gather: only these vectors are read
                if dt == "int8":
                    parts.append(s.scales(names[sh])[sel])
            return parts

        def read_release(idx: np.ndarray, m: int | None = None, **load_kw):
            tensors = [torch.load(release / f"{i:09d}.pth", **load_kw) for i in idx.tolist()]
            if m is not None:  # the whole file is read and unpickled, then m facets are kept
                tensors = [t[f] for t, f in zip(tensors, torch.from_numpy(pick(len(idx), m)))]
            return torch.stack(tensors)

        def read_release_f32(idx: np.ndarray):
            return read_release(idx).float()

        order = np.random.default_rng(args.seed + 1)
        batches = [order.choice(n, size=bsz, replace=False) for _ in range(args.batches + 1)]
        timings: dict[str, float] = {}
        m = args.m
        for b, idx in enumerate(batches):  # interleaved, so machine noise hits every layout alike
            runs = (
                ("release", read_release, (idx, m), {}),  # torch.load(path), as the released code calls it
                ("release_unsafe", read_release, (idx, m), {"weights_only": False}),
                ("fp16", read_store, ("fp16", idx, m), {}),
                ("int8", read_store, ("int8", idx, m), {}),
                ("release_full", read_release, (idx,), {}),
                ("fp16_full", read_store, ("fp16", idx), {}),
                ("int8_full", read_store, ("int8", idx), {}),
                ("release_f32", read_release_f32, (idx,), {}),
                ("fp16_f32", read_store, ("fp16", idx), {"as_float": True}),
            )
            for key, fn, fargs, fkw in runs:
                t = time.perf_counter()
                fn(*fargs, **fkw)
                if b:  # batch 0 warms up
                    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
        read = {key: args.batches * bsz / max(t, 1e-9) for key, t in timings.items()}

    return {
        "samples": n,
        "k": k,
        "dim": dim,
        "bytes_per_sample_fp16": sizes["fp16"] / n,
        "bytes_per_sample_int8": sizes["int8"] / n,
        "bytes_per_sample_release": sizes["release"] / n,
        "int8_vs_release": sizes["int8"] / sizes["release"],
        "fp16_vs_release": sizes["fp16"] / sizes["release"],
        "files_per_sample_release": 1.0,
        "files_per_sample_fp16": 2 * len(names) / n,
        "read_facets_per_sample": m,
        "read_samples_per_s_fp16": read["fp16"],
        "read_samples_per_s_int8": read["int8"],
        "read_samples_per_s_release": read["release"],
        "read_speedup": read["fp16"] / read["release"],
        "read_speedup_int8": read["int8"] / read["release"],
        "read_speedup_vs_weights_only_false": read["fp16"] / read["release_unsafe"],
        "read_speedup_full_rows": read["fp16_full"] / read["release_full"],
        "read_speedup_full_rows_int8": read["int8_full"] / read["release_full"],
        "read_speedup_full_rows_float32": read["fp16_f32"] / read["release_f32"],
        "write_speedup_fp16": t_write["release"] / max(t_write["fp16"], 1e-9),
        "int8_cosine_min": cos_min["int8"],
        "fp16_cosine_min": cos_min["fp16"],
        "torch_threads": torch.get_num_threads(),
    }
