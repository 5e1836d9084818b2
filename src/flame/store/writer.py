"""Writing one store shard: temporary files, then renamed into place (keys last)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from flame import fileio
from flame.fileio import TMP_SUFFIX, write_atomic
from flame.store.format import DTYPES, NonFiniteShard, disk_errors, quantize_int8


class _Store(Protocol):
    """What a writer needs of its store (an `EmbeddingStore`)."""

    k: int
    dim: int
    dtype: str

    def _shard_paths(self, name: str) -> dict[str, Path]: ...


class ShardWriter:
    """Streams rows of one shard into temporary files; `commit(keys)` renames them into
    place (array, scales, then keys last). `abort()` removes the temporary files."""

    def __init__(self, store: _Store, name: str, n: int):
        self.store, self.name, self.n = store, name, n
        self.paths = store._shard_paths(name)
        self.tmp = {k: p.with_name(p.name + TMP_SUFFIX) for k, p in self.paths.items()}
        self.array = self.scale = None
        try:
            with disk_errors(f"shard {name}"):
                self.array = _allocate(self.tmp["array"], DTYPES[store.dtype], (n, store.k, store.dim))
                if store.dtype == "int8":
                    self.scale = _allocate(self.tmp["scale"], np.float32, (n, store.k))
        except BaseException:
            self.abort()
            raise

    def write(self, rows, vectors: np.ndarray, facets: slice = slice(None)) -> None:
        """Store float vectors [len(rows), k, D] at `rows` (an index array or slice), facet
        columns `facets`; quantised per the store's dtype."""
        vectors = np.asarray(vectors, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite rows are refused at commit
            if self.scale is None:
                self.array[rows, facets] = vectors.astype(np.float16)
            else:
                q, s = quantize_int8(vectors)
                self.array[rows, facets] = q
                self.scale[rows, facets] = s

    def copy_rows(self, dst, src, facets: slice = slice(None)) -> None:
        """Copy already-stored (quantised) vectors: used for repeated captions."""
        self.array[dst, facets] = self.array[src, facets]
        if self.scale is not None:
            self.scale[dst, facets] = self.scale[src, facets]

    def non_finite_rows(self) -> np.ndarray:
        """Rows holding a NaN/inf anywhere (fp16 overflow turns large values into inf)."""
        bad = []
        for start in range(0, self.n, 1024):
            if self.scale is not None:  # int8 values are finite; the scale carries NaN/inf
                ok = np.isfinite(self.scale[start : start + 1024]).all(axis=1)
            else:
                ok = np.isfinite(self.array[start : start + 1024]).all(axis=(1, 2))
            bad.extend(np.flatnonzero(~ok) + start)
        return np.asarray(bad, dtype=np.int64)

    def commit(self, keys: Sequence[str]) -> int:
        """Check, fsync and rename everything into place (array, scales, keys last); returns
        the bytes written. A shard with non-finite vectors raises NonFiniteShard instead."""
        if len(keys) != self.n:
            raise ValueError(f"shard {self.name}: {len(keys)} keys for {self.n} rows")
        bad = self.non_finite_rows()
        if len(bad):
            first = ", ".join(repr(keys[i]) for i in bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise NonFiniteShard(
                f"{len(bad)} of {self.n} samples have non-finite vectors (NaN/inf, e.g. fp16 overflow in the "
                f"LLM; first keys: {first}); the shard is not written"
            )
        with disk_errors(f"shard {self.name}"):
            self.array.flush()
            self.array = None
            fileio.replace(self.tmp["array"], self.paths["array"])
            if self.scale is not None:
                self.scale.flush()
                self.scale = None
                fileio.replace(self.tmp["scale"], self.paths["scale"])
            write_atomic(self.paths["keys"], keys_json(keys))
        return sum(p.stat().st_size for k, p in self.paths.items() if k != "scale" or self.store.dtype == "int8")

    def abort(self) -> None:
        self.array = self.scale = None
        for p in self.tmp.values():
            p.unlink(missing_ok=True)


def keys_json(keys: Sequence[str]) -> bytes:
    """A keys file: UTF-8 JSON; keys that are not valid Unicode (file names that are not UTF-8,
    kept as surrogate escapes) are written as JSON \\u escapes, which read back exactly."""
    try:
        return (json.dumps(list(keys), ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(list(keys)) + "\n").encode("ascii")


def _allocate(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A writable .npy memory map whose blocks are reserved on disk now: a full disk fails
    here with ENOSPC instead of a SIGBUS on some later page write."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
    return array
