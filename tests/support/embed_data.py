"""Small generated webdataset shards and caption tables for the `flame embed` tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

WORDS = (
    "a an the dog cat man woman child car tree house red blue green small large photo of on in "
    "with and running sitting standing street park beach mountain sky water city night day"
).split()

# not an image decoder's idea of a JPEG: decoding it would fail, so the test also proves no decoding
FAKE_JPEG = b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20


def caption(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 12)))


def make_shards(folder: Path, n_shards: int = 3, per_shard: int = 6, seed: int = 0, repeat: bool = True) -> dict:
    """Write `folder/data-{0000..}.tar` and return {shard name: [(key, txt, short, long), ...]}.
    Some captions repeat (within and across shards) when `repeat`."""
    import webdataset as wds

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for s in range(n_shards):
        name = f"data-{s:04d}"
        rows = []
        with wds.TarWriter(str(folder / f"{name}.tar")) as w:
            for i in range(per_shard):
                key = f"{s:04d}{i:05d}"
                txt = "a red car on the street" if repeat and i % 3 == 2 else caption(rng)
                short, long = caption(rng, 5), caption(rng, 30)
                rows.append((key, txt, short, long))
                w.write({"__key__": key, "jpg": FAKE_JPEG, "txt": txt, "json": {"caption": txt, "key": key}})
        out[name] = rows
    return out


def write_table(path: Path, rows: list[dict]) -> Path:
    """rows: [{'__key__': ..., 'short': ..., 'long': ...}] in the format given by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(path)
    return path


def table_rows(shards: dict) -> list[dict]:
    return [{"__key__": k, "short": s, "long": lg} for rows in shards.values() for k, _, s, lg in rows]


def flame(*args, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (what a user runs)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flame", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        **kw,
    )


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store except the lock, by relative path."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"
    }
