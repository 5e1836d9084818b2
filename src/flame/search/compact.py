"""Garbage collection of a photo index: shards no live row points at are removed, and when
most stored rows are dead the live ones are copied into new shards, streamed in blocks (memory
bounded by one block of vectors, never the whole index)."""

from __future__ import annotations

import numpy as np

from flame.search.entries import STATS, Entries, EntryWriter, read_stats

COPY_ROWS = 512  # vectors copied at a time when compacting (10 MB of float32 at D 5120)


def next_shard(store) -> str:
    numbers = [int(n.split("-")[-1]) for n in store.shards if n.startswith("batch-") and n.split("-")[-1].isdigit()]
    return f"batch-{max(numbers, default=0) + 1:06d}"


def _remove(store, name: str) -> None:
    for p in store._shard_paths(name).values():
        p.unlink(missing_ok=True)
    (store.path / STATS / f"{name}.npy").unlink(missing_ok=True)


def collect_garbage(store, entries: Entries, writer: EntryWriter, shard_rows: int) -> None:
    """Remove shards the log does not name (a run killed between a shard and its log line) or
    whose rows are all dead; compact when fewer than half the stored rows are live."""
    for name in store.shards:
        if name not in entries.shards:
            _remove(store, name)
    sizes = {name: store.array(name).shape[0] for name in entries.shards}
    live = {name: sizes[name] - int(entries.dead(name, sizes[name]).sum()) for name in sizes}
    empty = [name for name, n in live.items() if n == 0]
    if empty:
        for name in empty:
            del entries.shards[name]
        writer.rewrite(entries)  # the log stops naming them first
        for name in empty:
            _remove(store, name)
    stored = sum(sizes[name] for name in entries.shards)
    if len(entries.shards) > 1 and 2 * sum(live.values()) < stored:
        _compact(store, entries, writer, shard_rows)


def _compact(store, entries: Entries, writer: EntryWriter, shard_rows: int) -> None:
    """Copy every live row, in commit order, into new shards of at most `shard_rows`; the log
    rewritten to name only them is the commit point; then the old shards go."""
    sources = list(entries.shards)
    chunk: list[tuple[str, np.ndarray]] = []
    fresh = Entries(root=entries.root)
    count = 0
    for name in sources:
        n = store.array(name).shape[0]
        rows = np.flatnonzero(~entries.dead(name, n))
        while len(rows):
            take, rows = rows[: shard_rows - count], rows[shard_rows - count :]
            chunk.append((name, take))
            count += len(take)
            if count == shard_rows:
                fresh.shards[_copy(store, writer, chunk, count)] = set()
                chunk, count = [], 0
    if chunk:
        fresh.shards[_copy(store, writer, chunk, count)] = set()
    writer.rewrite(fresh)
    entries.shards = fresh.shards
    for name in sources:
        _remove(store, name)


def _copy(store, writer: EntryWriter, chunk: list[tuple[str, np.ndarray]], count: int) -> str:
    name = next_shard(store)
    keys: list[str] = []
    stats = []
    out = store.shard_writer(name, count)
    try:
        dst = 0
        for src, rows in chunk:
            src_keys = store.keys(src)
            keys.extend(src_keys[r] for r in rows.tolist())
            stats.append(read_stats(store.path, src, len(src_keys))[rows])
            for s in range(0, len(rows), COPY_ROWS):
                block = rows[s : s + COPY_ROWS]
                out.write(slice(dst, dst + len(block)), store.get(src, block))
                dst += len(block)
        out.commit(keys)
    except BaseException:
        out.abort()
        raise
    writer.write_stats(name, np.concatenate(stats))
    return name
