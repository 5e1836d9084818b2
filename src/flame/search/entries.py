"""The live entries of a photo index (format 2): which stored rows are photos of the folder now.

    index.json          {"version": 2, "root": the photo folder}; small, rewritten atomically
    log.jsonl           append-only, one JSON record a line, each appended with one write and
                        fsynced: {"add": SHARD, "drop": {SHARD: [rows]}} when a run commits a
                        shard (its rows live; the rows it supersedes dead), {"drop": {...}} for
                        photos gone from the folder. A torn last line (a killed append) is
                        ignored and cut off by the next writer. Garbage collection rewrites the
                        log whole, atomically: one line per live shard (cost: shards + dead rows)
    stats/SHARD.npy     int64 [N, 2]: each row's photo size and mtime_ns (what a rerun compares)

A photo's path is its shard's store key (`shards/SHARD.keys.json`, row order), so nothing here
grows with path length, and a commit writes only the new shard's records: indexing N photos
writes O(N) bytes in all. A query reads only this log (shard names and dead rows), never the
paths of photos it does not return.

Format 1 (flame 0.1: `files.json`, path -> size, mtime_ns, shard, row, rewritten whole at every
commit) is read as it is by a query, and converted once by the next `flame search index`
(stats and log written, then files.json removed; each step atomic, a kill leaves format 1 whole).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flame.errors import FlameError
from flame.fileio import fsync_dir, remove_durable, write_atomic

HEADER = "index.json"
LOG = "log.jsonl"
STATS = "stats"
LEGACY_FILES = "files.json"
VERSION = 2


@dataclass
class Entries:
    """Committed shards in commit order, each with its dead rows; and the photo folder."""

    shards: dict[str, set[int]] = field(default_factory=dict)
    root: str | None = None

    def apply(self, record: dict) -> None:
        if "add" in record:
            self.shards[str(record["add"])] = set()
        for name, rows in (record.get("drop") or {}).items():
            if name in self.shards:
                self.shards[name].update(int(r) for r in rows)

    def dead(self, name: str, n: int) -> np.ndarray:
        """bool [n]: the shard's rows that are no photo of the folder any more."""
        mask = np.zeros(n, dtype=bool)
        rows = [r for r in self.shards.get(name, ()) if 0 <= r < n]
        mask[rows] = True
        return mask


def _log_lines(data: bytes, path: Path) -> tuple[list[dict], int]:
    """-> (records, bytes of complete lines). A torn last line is left out; a damaged
    line before it is an error."""
    end = data.rfind(b"\n") + 1
    records = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise FlameError(f"{path}: line {number} is damaged ({e.__class__.__name__}); "
                             "rerun flame search index with --rebuild") from e
        records.append(record)
    return records, end


def read_entries(index: Path) -> Entries | None:
    """The format-2 entries of an index, or None when it has no log (format 1, or new)."""
    path = index / LOG
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FlameError(f"cannot read {path}: {e.strerror}") from e
    entries = Entries(root=_read_root(index))
    for record in _log_lines(data, path)[0]:
        entries.apply(record)
    return entries


def _read_root(index: Path) -> str | None:
    try:
        root = json.loads((index / HEADER).read_text()).get("root")
        return root if isinstance(root, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def read_legacy(index: Path, store) -> tuple[Entries, dict[str, np.ndarray]] | None:
    """A format-1 index's files.json as entries and stats, in memory; None without one.
    Unreadable bookkeeping gives empty entries: everything is re-encoded, nothing is lost."""
    path = index / LEGACY_FILES
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files, root = dict(data["files"]), data.get("root")
    except (OSError, ValueError, KeyError, TypeError):
        return Entries(), {}
    complete = set(store.shards)
    by_shard: dict[str, list[tuple[int, int, int]]] = {}
    for e in files.values():
        try:
            if e["shard"] in complete:
                by_shard.setdefault(e["shard"], []).append((int(e["row"]), int(e["size"]), int(e["mtime_ns"])))
        except (KeyError, TypeError, ValueError):
            continue
    entries, stats = Entries(root=root if isinstance(root, str) else None), {}
    for name in sorted(by_shard):
        n = store.array(name).shape[0]
        live = np.zeros(n, dtype=bool)
        stat = np.zeros((n, 2), dtype=np.int64)
        for row, size, mtime in by_shard[name]:
            if 0 <= row < n:
                live[row] = True
                stat[row] = (size, mtime)
        entries.shards[name] = set(np.flatnonzero(~live).tolist())
        stats[name] = stat
    return entries, stats


def read_stats(index: Path, name: str, n: int) -> np.ndarray:
    """int64 [n, 2] (size, mtime_ns) of a shard's rows; -1 (never a real photo's, so the
    photo is re-encoded) where the file is missing or does not fit."""
    try:
        stat = np.load(index / STATS / f"{name}.npy", allow_pickle=False)
        if stat.shape == (n, 2) and stat.dtype == np.int64:
            return stat
    except (OSError, ValueError):
        pass
    return np.full((n, 2), -1, dtype=np.int64)


class EntryWriter:
    """Appends to the log of an index whose lock the caller holds."""

    def __init__(self, index: Path):
        self.index = index
        self.path = index / LOG
        self.bytes_written = 0

    def repair(self) -> None:
        """Cut a torn last line (a killed append) so the next record starts on its own line."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        end = _log_lines(data, self.path)[1]
        if end < len(data):
            os.truncate(self.path, end)

    def write_stats(self, name: str, stat: np.ndarray) -> None:
        (self.index / STATS).mkdir(exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, np.asarray(stat, dtype=np.int64), allow_pickle=False)
        write_atomic(self.index / STATS / f"{name}.npy", buf.getvalue())
        self.bytes_written += buf.tell()

    def append(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        created = not self.path.exists()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self.index)
        self.bytes_written += len(line)

    def rewrite(self, entries: Entries) -> None:
        """The whole log as one line per shard (commit order kept), atomically."""
        lines = []
        for name, dead in entries.shards.items():
            record: dict = {"add": name}
            if dead:
                record["drop"] = {name: sorted(dead)}
            lines.append(json.dumps(record, separators=(",", ":")) + "\n")
        data = "".join(lines).encode()
        write_atomic(self.path, data)
        self.bytes_written += len(data)

    def write_root(self, root: Path) -> None:
        root_text = str(Path(root).resolve())
        if _read_root(self.index) != root_text or not (self.index / HEADER).is_file():
            data = json.dumps({"version": VERSION, "root": root_text}) + "\n"  # ASCII: any path survives
            write_atomic(self.index / HEADER, data)
            self.bytes_written += len(data)

    def convert_legacy(self, entries: Entries, stats: dict[str, np.ndarray], root: Path) -> None:
        """Format 1 -> 2: stats, then the log (the commit point), then files.json goes."""
        for name, stat in stats.items():
            self.write_stats(name, stat)
        self.rewrite(entries)
        self.write_root(Path(entries.root) if entries.root else root)
        remove_durable(self.index / LEGACY_FILES)

    def clear(self) -> None:
        """--rebuild: forget every entry (the shards go with the store's overwrite)."""
        for path in (self.path, self.index / HEADER, self.index / LEGACY_FILES):
            remove_durable(path)
        for p in (self.index / STATS).glob("*") if (self.index / STATS).is_dir() else ():
            p.unlink(missing_ok=True)
