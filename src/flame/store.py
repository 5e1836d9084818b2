"""The embedding store: one memory-mappable array per input shard plus a manifest.

Layout (everything written to a temporary name, then renamed; `NAME.keys.json` is
written last, so its presence marks a shard complete):

    STORE/manifest.json            format, version, LLM spec + fingerprint, layer, positions,
                                   prompt sets, facet names, K, D, dtype, normalized
    STORE/shards/NAME.npy          [N, K, D] float16 or int8 (np.save format)
    STORE/shards/NAME.scale.npy    [N, K] float32, int8 stores only (x = q * scale)
    STORE/shards/NAME.keys.json    the N webdataset `__key__`s in row order

int8 uses one symmetric scale per vector: scale = max|x| / 127, q = round(x / scale).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flame.errors import FlameError
from flame.fileio import TMP_SUFFIX, write_atomic

FORMAT = "flame-embeddings"
VERSION = 1
DTYPES = {"fp16": np.float16, "int8": np.int8}
# Manifest fields that may differ between two runs writing the same store.
_IGNORED_IN_COMPARISON = {("llm", "spec")}


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def manifest_difference(old: dict, new: dict) -> str | None:
    """None if a store with manifest `old` can take rows computed under `new`; otherwise
    a short description of the first difference (the LLM spec string itself may differ:
    the weights' fingerprint decides)."""
    keys = sorted(set(old) | set(new))
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if (key, sub) in _IGNORED_IN_COMPARISON:
                    continue
                if a.get(sub) != b.get(sub):
                    return f"{key}.{sub}: store has {_short(a.get(sub))}, this run {_short(b.get(sub))}"
        elif a != b:
            return f"{key}: store has {_short(a)}, this run {_short(b)}"
    return None


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quantize_int8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., D] float -> (int8 [..., D], float32 scale [...]) with x ~= q * scale."""
    x = np.asarray(vectors, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale


class ShardWriter:
    """Streams rows of one shard into temporary files; `commit(keys)` renames them into
    place (array, scales, then keys last). `abort()` removes the temporary files."""

    def __init__(self, store: EmbeddingStore, name: str, n: int):
        self.store, self.name, self.n = store, name, n
        self.paths = store._shard_paths(name)
        self.tmp = {k: p.with_name(p.name + TMP_SUFFIX) for k, p in self.paths.items()}
        self.array = np.lib.format.open_memmap(
            self.tmp["array"], mode="w+", dtype=DTYPES[store.dtype], shape=(n, store.k, store.dim)
        )
        self.scale = None
        if store.dtype == "int8":
            self.scale = np.lib.format.open_memmap(self.tmp["scale"], mode="w+", dtype=np.float32, shape=(n, store.k))

    def write(self, rows, vectors: np.ndarray, facets: slice = slice(None)) -> None:
        """Store float vectors [len(rows), k, D] at `rows` (an index array or slice), facet
        columns `facets`; quantised per the store's dtype."""
        vectors = np.asarray(vectors, dtype=np.float32)
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

    def commit(self, keys: Sequence[str]) -> int:
        """Rename everything into place; returns the bytes written."""
        if len(keys) != self.n:
            raise ValueError(f"shard {self.name}: {len(keys)} keys for {self.n} rows")
        self.array.flush()
        self.array = None
        os.replace(self.tmp["array"], self.paths["array"])
        if self.scale is not None:
            self.scale.flush()
            self.scale = None
            os.replace(self.tmp["scale"], self.paths["scale"])
        write_atomic(self.paths["keys"], (json.dumps(list(keys), ensure_ascii=False) + "\n").encode())
        return sum(p.stat().st_size for k, p in self.paths.items() if k != "scale" or self.store.dtype == "int8")

    def abort(self) -> None:
        self.array = self.scale = None
        for p in self.tmp.values():
            p.unlink(missing_ok=True)


class EmbeddingStore:
    """Read (and write) a folder made by `flame embed`. Reading never loads whole arrays:
    `array(name)` is a memory map, `get(name, rows)` gathers and dequantises rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise FlameError(f"{self.path} is not an embedding store (no manifest.json); make one with flame embed")
        try:
            self.manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise FlameError(f"{mf}: cannot read the manifest ({e.__class__.__name__})") from e
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise FlameError(f"{mf} is not a {FORMAT} manifest")
        if self.manifest.get("version") != VERSION:
            raise FlameError(
                f"{mf}: store format version {self.manifest.get('version')} is not supported "
                f"(this flame reads version {VERSION})"
            )
        if self.manifest.get("dtype") not in DTYPES:
            raise FlameError(f"{mf}: unknown dtype {self.manifest.get('dtype')!r}")
        self._arrays: dict[str, np.ndarray] = {}
        self._scales: dict[str, np.ndarray] = {}
        self._keys: dict[str, list[str]] = {}
        self._index: dict[str, dict[str, int]] = {}

    # ---- manifest fields -------------------------------------------------------------
    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def facet_names(self) -> list[str]:
        return list(self.manifest["facets"])

    @property
    def shard_dir(self) -> Path:
        return self.path / "shards"

    @property
    def shards(self) -> list[str]:
        """Names of complete shards (those whose keys file exists), sorted."""
        if not self.shard_dir.is_dir():
            return []
        suffix = ".keys.json"
        return sorted(p.name[: -len(suffix)] for p in self.shard_dir.glob("*" + suffix))

    def is_complete(self, name: str) -> bool:
        return self._shard_paths(name)["keys"].is_file()

    def __len__(self) -> int:
        return sum(self.array(name).shape[0] for name in self.shards)

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.path)!r}, shards={len(self.shards)}, k={self.k}, "
            f"dim={self.dim}, dtype={self.dtype})"
        )

    # ---- reading ---------------------------------------------------------------------
    def _shard_paths(self, name: str) -> dict[str, Path]:
        d = self.shard_dir
        return {"array": d / f"{name}.npy", "scale": d / f"{name}.scale.npy", "keys": d / f"{name}.keys.json"}

    def _require(self, name: str) -> dict[str, Path]:
        paths = self._shard_paths(name)
        if not paths["keys"].is_file():
            raise FlameError(f"store {self.path} has no complete shard {name!r}")
        return paths

    def array(self, name: str) -> np.ndarray:
        """The shard's raw [N, K, D] array (float16 or int8) as a read-only memory map."""
        if name not in self._arrays:
            self._arrays[name] = np.load(self._require(name)["array"], mmap_mode="r")
        return self._arrays[name]

    def scales(self, name: str) -> np.ndarray | None:
        """[N, K] float32 scales (int8 stores), else None."""
        if self.dtype != "int8":
            return None
        if name not in self._scales:
            self._scales[name] = np.load(self._require(name)["scale"], mmap_mode="r")
        return self._scales[name]

    def keys(self, name: str) -> list[str]:
        if name not in self._keys:
            self._keys[name] = json.loads(self._require(name)["keys"].read_text())
        return self._keys[name]

    def index(self, name: str) -> dict[str, int]:
        """key -> row for one shard."""
        if name not in self._index:
            self._index[name] = {key: i for i, key in enumerate(self.keys(name))}
        return self._index[name]

    def get(self, name: str, rows, facets=None) -> np.ndarray:
        """float32 [n, K, D] for `rows` (an int gives [K, D]; a slice or index array
        [n, K, D]), dequantised; `facets` (indices) keeps only those facets, so only their
        vectors are read. Sorted index arrays read fastest."""
        if not isinstance(rows, int | np.integer | slice):
            rows = np.asarray(rows, dtype=np.int64)
        sel = rows
        if facets is not None:
            facets = np.asarray(facets, dtype=np.int64)
            sel = (rows[:, None], facets) if isinstance(rows, np.ndarray) else (rows, facets)
        out = np.asarray(self.array(name)[sel], dtype=np.float32)
        if self.dtype == "int8":
            out *= np.asarray(self.scales(name)[sel], dtype=np.float32)[..., None]
        return out

    # ---- writing ---------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, manifest: dict, overwrite: bool = False) -> EmbeddingStore:
        """Open the store at `path` for writing under `manifest`, creating it if needed.
        An existing store made under a different manifest (other LLM weights, layer,
        prompts, positions, dtype...) is refused unless `overwrite`, which deletes its
        shards. The manifest file is left byte-for-byte alone when it already matches."""
        path = Path(path)
        manifest = dict(manifest)
        manifest.setdefault("format", FORMAT)
        manifest.setdefault("version", VERSION)
        if manifest.get("dtype") not in DTYPES:
            raise FlameError(f"unknown store dtype {manifest.get('dtype')!r}: use one of {', '.join(DTYPES)}")
        mf = path / "manifest.json"
        if path.exists() and not path.is_dir():
            raise FlameError(f"{path} exists and is not a folder")
        if mf.is_file():
            try:
                old = json.loads(mf.read_text())
            except (OSError, ValueError):
                old = {"format": "unreadable"}
            diff = manifest_difference(old, manifest) if old.get("format") == FORMAT else "not a flame store"
            if diff is None:
                return cls(path)
            if not overwrite:
                raise FlameError(
                    f"store {path} was made with different settings ({diff}); "
                    "use --overwrite to replace it or choose another --out"
                )
            shutil.rmtree(path / "shards", ignore_errors=True)
            mf.unlink()
        elif path.is_dir():
            ours = {".lock", "shards", "manifest.json" + TMP_SUFFIX}
            stray = [p.name for p in path.iterdir() if p.name not in ours]
            if stray:
                raise FlameError(
                    f"{path} exists and is not an embedding store (holds {stray[0]!r}); choose another --out"
                )
        (path / "shards").mkdir(parents=True, exist_ok=True)
        write_atomic(mf, manifest_bytes(manifest))
        return cls(path)

    def clean_temporaries(self) -> int:
        """Remove temporary files left by a killed writer. Call only while holding the lock."""
        n = 0
        for p in self.shard_dir.glob("*" + TMP_SUFFIX):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def shard_writer(self, name: str, n: int) -> ShardWriter:
        return ShardWriter(self, name, n)

    def write_shard(self, name: str, keys: Sequence[str], vectors: np.ndarray) -> int:
        """Write a whole shard: float vectors [N, K, D] (normalised by the caller),
        quantised per the manifest's dtype. Returns the bytes written."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 3 or vectors.shape[1:] != (self.k, self.dim):
            raise ValueError(f"shard {name}: expected [N, {self.k}, {self.dim}], got {list(vectors.shape)}")
        if len(keys) != vectors.shape[0]:
            raise ValueError(f"shard {name}: {len(keys)} keys for {vectors.shape[0]} rows")
        writer = self.shard_writer(name, vectors.shape[0])
        try:
            if len(keys):
                writer.write(slice(None), vectors)
            return writer.commit(keys)
        except BaseException:
            writer.abort()
            raise
