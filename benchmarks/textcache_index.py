"""Cost of the text cache's index when a process starts: a space of N cached captions (tiny
float16 vectors, D=4, chunks of 512 as `TextEncoder` writes them), then a fresh process asks for
one caption (what `flame search query` / one `encode_text` call does). Peak memory above the
process's import baseline and the wall time of that first lookup, for each source tree given.

    PYTHONPATH=src .venv/bin/python benchmarks/textcache_index.py --src before=/path/to/old/src \\
        --src after=src --entries 100000 300000 1000000

Each tree writes its own space with its own cache code (the on-disk formats differ).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIM, CHUNK = 4, 512


def _caption(i: int) -> str:
    return f"a photo of caption number {i:09d}"


def worker_write(folder: Path, n: int) -> dict:
    import numpy as np

    from flame.textenc import _Space

    space = _Space(folder, {"bench": 1})
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for start in range(0, n, CHUNK):
        caps = [_caption(i) for i in range(start, min(n, start + CHUNK))]
        space.add(caps, rng.standard_normal((len(caps), DIM)).astype(np.float32))
    return {"write_s": round(time.perf_counter() - t, 2)}


def worker_query(folder: Path, n: int) -> dict:
    from flame.textenc import _Space

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    space = _Space(folder, {"bench": 1})
    want = [_caption(n // 2)]
    assert space.missing(want) == []
    space.get(want)
    first = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    for i in range(1, 101):  # later lookups of other captions in the same process
        c = [_caption(i * (n // 101))]
        space.missing(c)
        space.get(c)
    return {"first_lookup_s": round(first, 3), "index_mb": round((peak - base) / 1024, 1),
            "next_100_lookups_ms": round((time.perf_counter() - t) * 1000, 1),
            "open_fds": len(os.listdir("/proc/self/fd"))}


def run(src: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", action="append", default=[], help="NAME=PATH of a source tree (PYTHONPATH)")
    ap.add_argument("--entries", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--worker", choices=("write", "query"))
    ap.add_argument("--folder")
    ap.add_argument("-n", type=int)
    a = ap.parse_args()
    if a.worker:
        fn = worker_write if a.worker == "write" else worker_query
        print(json.dumps(fn(Path(a.folder), a.n)))
        return
    with tempfile.TemporaryDirectory(prefix="textcache-bench-") as tmp:
        for spec in a.src:
            name, src = spec.split("=", 1)
            for n in a.entries:
                folder = Path(tmp) / f"{name}-{n}"
                row = {"tree": name, "entries": n}
                row.update(run(src, ["--worker", "write", "--folder", str(folder), "-n", str(n)]))
                row.update(run(src, ["--worker", "query", "--folder", str(folder), "-n", str(n)]))
                row["disk_mb"] = round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 1)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
