"""The text cache's storage: one folder per text space (see `flame.textenc` for what a space
is), float16 vector chunks registered in an sqlite index.

    FOLDER/space.json          what the space stands for (for people, not read back)
    FOLDER/index.sqlite        caption key (16 bytes of sha256) -> (chunk, row); per chunk its
                               rows, width and sha256 digest; written in one transaction per chunk
    FOLDER/NAME.npy            float16 [n, D] vectors of one written chunk
    FOLDER/NAME.keys.json      the n captions, in row order (ASCII JSON: lone surrogates escaped)

Chunks are append-only, uniquely named and written atomically (temporary name + rename),
then registered; the first registered entry of a caption is the one served, and a file the
index does not name is never read (files planted in the folder shadow nothing). A folder
written before the index existed is imported once, in its old order (by file name). Any
number of processes may read and write one cache on a file system whose locks sqlite can use
(local disks; NFS only with working locks).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flame.errors import FlameError
from flame.fileio import write_atomic

CACHE_VERSION = 1
CACHE_DTYPE = np.float16
CHUNK = 512  # a chunk of fewer rows is "small": merged with others by `compact`
COMPACT_AT = 64  # merge a space's small chunks into one when more than this many exist
OPEN_ARRAYS = 8  # chunk files memory-mapped at once (each map holds a file descriptor)
INDEX = "index.sqlite"
_NAME = re.compile(r"^(chunk|merged)-\d+-[0-9a-f]{12}$")  # the chunk names this cache writes


class DamagedChunk(FlameError):
    """A cached chunk failed its checks (size, dtype, width, digest, finite values)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"text cache chunk {path} is damaged ({why}); delete it and "
                         f"{path.name[:-4]}.keys.json to recompute")
        self.chunk = path.name[:-4]


def caption_key(caption: str) -> bytes:
    """16 bytes of sha256 of the caption's UTF-8 (lone surrogates kept as written: surrogatepass)."""
    return hashlib.sha256(caption.encode("utf-8", "surrogatepass")).digest()[:16]


class TextCache:
    """The cached vectors of one text space. `index.sqlite` maps caption keys to (chunk, row)
    in write order (the first registered entry of a caption is the one served); a chunk file
    that is not registered there is never read, so files planted in the folder shadow nothing.
    Lookups ask the index for the captions at hand only (nothing is read whole on start), and
    at most OPEN_ARRAYS chunk files are open (memory-mapped) at once."""

    def __init__(self, folder: Path, description: dict, dim: int | None = None):
        self.folder = folder
        self.description = description
        self.dim = dim
        self.index: dict[str, tuple[str, int]] = {}  # captions this process looked up -> (chunk, row)
        self.arrays: OrderedDict[str, np.ndarray] = OrderedDict()  # at most OPEN_ARRAYS
        self._verified: set[str] = set()
        self._db: sqlite3.Connection | None = None
        self._pid = 0

    # -- the index -------------------------------------------------------------------------
    def _conn(self, create: bool) -> sqlite3.Connection | None:
        if self._db is not None and self._pid == os.getpid():
            return self._db
        path = self.folder / INDEX
        if not create and not path.is_file() and not next(self.folder.glob("*.keys.json"), None):
            return None  # nothing cached (a folder of chunks without an index is imported below)
        self.folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=600, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS chunks (name TEXT PRIMARY KEY, rows INTEGER, dim INTEGER, "
                       "digest TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS entries (key BLOB PRIMARY KEY, chunk TEXT, row INTEGER)")
            db.execute("CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT)")
            if db.execute("SELECT value FROM info WHERE name = 'format'").fetchone() is None:
                self._import_legacy(db)
                db.execute("INSERT INTO info VALUES ('format', ?)", (str(CACHE_VERSION),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            db.close()
            raise
        self._db, self._pid = db, os.getpid()
        return db

    def _import_legacy(self, db: sqlite3.Connection) -> None:
        """Chunks written before the index existed (keys.json files), in their old order (by name)."""
        for keys_file in sorted(self.folder.glob("*.keys.json")):
            name = keys_file.name[: -len(".keys.json")]
            try:
                keys = json.loads(keys_file.read_text())
                arr = np.load(self.folder / f"{name}.npy", mmap_mode="r")
                shape = arr.shape
                del arr
            except (OSError, ValueError):
                continue
            if _NAME.match(name) and len(shape) == 2 and shape[0] == len(keys):
                self._register(db, name, keys, shape[1], digest=None)

    @staticmethod
    def _register(db: sqlite3.Connection, name: str, captions: list[str], dim: int, digest: str | None) -> None:
        db.execute("INSERT INTO chunks VALUES (?, ?, ?, ?)", (name, len(captions), dim, digest))
        db.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?)",
                       ((caption_key(c), name, row) for row, c in enumerate(captions)))

    def refresh(self) -> None:
        """Forget this process's lookups (the index on disk is always current)."""
        self.index.clear()
        self.arrays.clear()

    def _lookup(self, captions: Sequence[str]) -> None:
        db = self._conn(create=False)
        todo = [c for c in dict.fromkeys(captions) if c not in self.index]
        if db is None or not todo:
            return
        for i in range(0, len(todo), 500):
            part = {caption_key(c): c for c in todo[i : i + 500]}
            marks = ",".join("?" * len(part))
            for key, chunk, row in db.execute(f"SELECT key, chunk, row FROM entries WHERE key IN ({marks})",
                                              list(part)):
                self.index[part[key]] = (chunk, row)

    def missing(self, captions: Sequence[str]) -> list[str]:
        unique = list(dict.fromkeys(captions))
        self._lookup(unique)
        return [c for c in unique if c not in self.index]

    # -- reading ---------------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray:
        if name in self.arrays:
            self.arrays.move_to_end(name)
            return self.arrays[name]
        path = self.folder / f"{name}.npy"
        info = self._conn(create=False).execute("SELECT rows, dim, digest FROM chunks WHERE name = ?",
                                                (name,)).fetchone()
        if info is None:
            raise FileNotFoundError(path)  # compacted away since the lookup
        rows, dim, digest = info
        if digest and name not in self._verified:
            if _digest(path.read_bytes()) != digest:
                raise DamagedChunk(path, "its content differs from the digest recorded when it was written")
            self._verified.add(name)
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise DamagedChunk(path, "not a readable .npy file") from e
        want = (rows, self.dim or dim)
        if arr.dtype != CACHE_DTYPE or arr.shape != want or dim != want[1]:
            raise DamagedChunk(path, f"{arr.dtype} {list(arr.shape)}, expected {np.dtype(CACHE_DTYPE)} {list(want)}")
        self.arrays[name] = arr
        while len(self.arrays) > OPEN_ARRAYS:
            self.arrays.popitem(last=False)
        return arr

    def get(self, captions: Sequence[str], retry: bool = True) -> np.ndarray:
        """float32 [n, D] for captions that are all in the cache."""
        self._lookup(captions)
        rows_by_chunk: dict[str, list[tuple[int, int]]] = {}
        for i, c in enumerate(captions):
            name, row = self.index[c]
            rows_by_chunk.setdefault(name, []).append((i, row))
        out = None
        for name, pairs in rows_by_chunk.items():
            try:
                arr = self._array(name)
            except FileNotFoundError:  # compacted away by another process: look up again, once
                if not retry:
                    raise
                self.refresh()
                return self.get(captions, retry=False)
            idx = np.array([r for _, r in pairs])
            order = np.argsort(idx, kind="stable")
            vals = np.asarray(arr[idx[order]], dtype=np.float32)
            if not np.isfinite(vals).all():
                raise DamagedChunk(self.folder / f"{name}.npy", "it holds values that are not finite")
            if out is None:
                out = np.empty((len(captions), arr.shape[1]), dtype=np.float32)
            out[np.array([pairs[j][0] for j in order])] = vals
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def forget(self, name: str) -> None:
        """Unregister a damaged chunk (its file stays, unread): its captions are recomputed."""
        db = self._conn(create=False)
        if db is not None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM entries WHERE chunk = ?", (name,))
            db.execute("DELETE FROM chunks WHERE name = ?", (name,))
            db.execute("COMMIT")
        self.refresh()

    # -- writing ---------------------------------------------------------------------------
    def add(self, captions: list[str], vectors: np.ndarray) -> None:
        """Write one chunk (array, then keys), then register it in the index."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "space.json").is_file():
            try:
                write_atomic(self.folder / "space.json", json.dumps(self.description, indent=2))
            except FileNotFoundError:  # another process wrote it at the same moment (same temporary name)
                pass
        name = f"chunk-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        db = self._conn(create=True)
        digest, dim = self._write(name, captions, vectors)
        try:
            db.execute("BEGIN IMMEDIATE")
            self._register(db, name, captions, dim, digest)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._unlink(name)
            raise
        for c in captions:
            self.index.pop(c, None)
        small = db.execute("SELECT COUNT(*) FROM chunks WHERE rows < ?", (CHUNK,)).fetchone()[0]
        if small > COMPACT_AT:
            self.compact()

    def _write(self, name: str, captions: list[str], vectors: np.ndarray) -> tuple[str, int]:
        buf = io.BytesIO()
        arr = np.ascontiguousarray(vectors, dtype=CACHE_DTYPE)
        np.save(buf, arr)
        data = buf.getvalue()
        write_atomic(self.folder / f"{name}.npy", data)
        try:  # ASCII JSON: a lone surrogate is written as its escape and read back as written
            write_atomic(self.folder / f"{name}.keys.json", json.dumps(captions))
        except BaseException:
            self._unlink(name)
            raise
        return _digest(data), int(arr.shape[1])

    def _unlink(self, name: str) -> None:
        for suffix in (".keys.json", ".npy"):
            (self.folder / f"{name}{suffix}").unlink(missing_ok=True)
        self.arrays.pop(name, None)

    def compact(self) -> None:
        """Merge the small chunks (many short calls leave many) into one; full chunks stay.
        The merged chunk is registered in the same transaction that unregisters the old ones
        (which must all still be registered, else another process compacted them first and
        this merge is dropped); their files are removed after. A reader holding an old chunk's
        memory map keeps reading it (POSIX unlink semantics); one that had not opened it yet
        looks its captions up again (see `get`)."""
        db = self._conn(create=False)
        small = [n for (n,) in db.execute("SELECT name FROM chunks WHERE rows < ?", (CHUNK,))]
        captions: list[str] = []
        vectors = []
        for name in small:
            try:
                keys = json.loads((self.folder / f"{name}.keys.json").read_text())
                arr = self._array(name)
            except (FileNotFoundError, ValueError, DamagedChunk):
                return  # compacted by another process meanwhile (or damaged: left to `forget`)
            live = {caption_key(c): (row, c) for row, c in enumerate(keys)}
            if not live:
                continue
            marks = ",".join("?" * len(live))
            for key, row in db.execute(f"SELECT key, row FROM entries WHERE chunk = ? AND key IN ({marks})",
                                       [name, *live]):
                captions.append(live[key][1])
                vectors.append(np.asarray(arr[row], dtype=np.float32))
        if len(small) < 2 or not captions:
            return
        name = f"merged-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        digest, dim = self._write(name, captions, np.stack(vectors))
        db.execute("BEGIN IMMEDIATE")
        marks = ",".join("?" * len(small))
        if db.execute(f"DELETE FROM chunks WHERE name IN ({marks})", small).rowcount != len(small):
            db.execute("ROLLBACK")
            self._unlink(name)
            return
        db.execute("INSERT INTO chunks VALUES (?, ?, ?, ?)", (name, len(captions), dim, digest))
        db.executemany("UPDATE entries SET chunk = ?, row = ? WHERE key = ?",
                       ((name, row, caption_key(c)) for row, c in enumerate(captions)))
        db.execute("COMMIT")
        for o in small:
            self._unlink(o)
        self.refresh()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]
