"""`EmbeddingStore`: reading (checked, bounded) and writing one store folder (see `flame.store`)."""

from __future__ import annotations

import json
import os
import resource
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flame import fileio
from flame.errors import FlameError, first_line
from flame.fileio import TMP_SUFFIX, write_atomic
from flame.store.format import ATTEMPTS, DTYPES, FORMAT, VERSION, disk_errors, manifest_bytes, manifest_difference
from flame.store.writer import ShardWriter


def _default_max_open() -> int:
    """Open shards kept at most: a memory map holds a file descriptor (two per int8 shard),
    so stay well under the process's limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 64
    return max(2, min(64, soft // 8))


class KeyIndex:
    """key -> row of one shard, compact: the keys' UTF-8 bytes sorted and concatenated into one
    buffer, with their end offsets and rows (len(key) + 8 bytes per key: no key pays for the
    longest one; a dict of str and the key list cost ~130). Keys that are not valid Unicode
    (surrogate escapes of non-UTF-8 names) are kept exactly (surrogatepass)."""

    def __init__(self, keys: Sequence[str]):
        encoded = [k.encode("utf-8", "surrogatepass") for k in keys]
        order = sorted(range(len(encoded)), key=encoded.__getitem__)
        self._blob = b"".join(encoded[i] for i in order)
        wide = len(self._blob) >= 2**31 or len(keys) >= 2**31
        self._ends = np.cumsum(np.fromiter((len(encoded[i]) for i in order), dtype=np.int64, count=len(order)))
        self._ends = self._ends.astype(np.int64 if wide else np.int32)
        self._order = np.asarray(order, dtype=np.int64 if wide else np.int32)

    def _key(self, i: int) -> bytes:
        return self._blob[int(self._ends[i - 1]) if i else 0 : int(self._ends[i])]

    def get(self, key: str, default=None):
        b = key.encode("utf-8", "surrogatepass")
        lo, hi = 0, len(self._order)
        while lo < hi:  # bisect over the sorted keys
            mid = (lo + hi) // 2
            if self._key(mid) < b:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self._order) and self._key(lo) == b:
            return int(self._order[lo])
        return default

    def __getitem__(self, key: str) -> int:
        row = self.get(key)
        if row is None:
            raise KeyError(key)
        return row

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __len__(self) -> int:
        return len(self._order)

    @property
    def nbytes(self) -> int:
        return len(self._blob) + self._ends.nbytes + self._order.nbytes


@dataclass
class _OpenShard:
    array: np.ndarray
    scale: np.ndarray | None
    index: KeyIndex


class EmbeddingStore:
    """Read (and write) a folder made by `flame embed`. Reading never loads whole arrays:
    `array(name)` is a memory map, `get(name, rows)` gathers and dequantises rows."""

    def __init__(self, path: str | Path, max_open: int | None = None):
        self.path = Path(path)
        self.max_open = max_open or _default_max_open()
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
        for field_ in ("k", "dim"):
            if not isinstance(self.manifest.get(field_), int) or self.manifest[field_] < 1:
                raise FlameError(f"{mf}: {field_} must be a positive integer, not {self.manifest.get(field_)!r}")
        self._open: OrderedDict[str, _OpenShard] = OrderedDict()

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
        return {"array": d / f"{name}.npy", "scale": d / f"{name}.scale", "keys": d / f"{name}.keys.json"}

    def _require(self, name: str) -> dict[str, Path]:
        paths = self._shard_paths(name)
        if not paths["keys"].is_file():
            raise FlameError(f"store {self.path} has no complete shard {name!r}")
        return paths

    def _bad(self, name: str, problem: str) -> FlameError:
        return FlameError(
            f"store {self.path}: shard {name!r} is damaged ({problem}); delete shards/{name}.keys.json "
            "and rerun flame embed to recompute it"
        )

    def _read_keys(self, name: str) -> list[str]:
        path = self._require(name)["keys"]
        try:
            keys = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise self._bad(name, f"{path.name} is unreadable: {e.__class__.__name__}") from e
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise self._bad(name, f"{path.name} is not a list of keys")
        return keys

    def _map(self, name: str, path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
        """Validate a .npy file's header and size against what the manifest and the keys
        imply (no data is read), then memory-map it read-only."""
        what = path.name
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read_header:
                    raise ValueError(f"npy format version {version}")
                got_shape, fortran, got_dtype = read_header[version](f)
                offset, size = f.tell(), os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise self._bad(name, f"{what} is missing") from None
        except (OSError, ValueError) as e:
            raise self._bad(name, f"{what} is not a valid .npy file: {first_line(e)}") from e
        want_dtype = np.dtype(dtype)
        if got_dtype != want_dtype:
            raise self._bad(name, f"{what} holds {got_dtype}, the manifest says {self.dtype} ({want_dtype})")
        if fortran:
            raise self._bad(name, f"{what} is in Fortran order")
        if tuple(got_shape) != shape:
            labels = ["N (keys)", "K", "D"][: len(shape)]
            diff = ", ".join(f"{lab} {g} vs {w}" for lab, g, w in zip(labels, got_shape, shape) if g != w)
            raise self._bad(
                name,
                f"{what} has shape {list(got_shape)}, the manifest and keys say {list(shape)}"
                + (f": {diff}" if diff and len(got_shape) == len(shape) else ""),
            )
        expected = offset + int(np.prod(shape)) * want_dtype.itemsize
        if size != expected:
            kind = "truncated" if size < expected else "longer than its header says"
            raise self._bad(name, f"{what} is {kind}: {size:,} bytes, expected {expected:,}")
        return np.load(path, mmap_mode="r")

    def _shard(self, name: str) -> _OpenShard:
        """The open shard (validated on first use), most recently used last; the least
        recently used is closed once more than `max_open` are open."""
        shard = self._open.get(name)
        if shard is not None:
            self._open.move_to_end(name)
            return shard
        keys = self._read_keys(name)
        paths = self._shard_paths(name)
        array = self._map(name, paths["array"], DTYPES[self.dtype], (len(keys), self.k, self.dim))
        scale = None
        if self.dtype == "int8":
            scale_path = paths["scale"]
            if not scale_path.exists() and (self.shard_dir / f"{name}.scale.npy").exists():
                scale_path = self.shard_dir / f"{name}.scale.npy"  # stores written before the rename
            scale = self._map(name, scale_path, np.float32, (len(keys), self.k))
        shard = self._open[name] = _OpenShard(array, scale, KeyIndex(keys))
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return shard

    def validate(self, names: Sequence[str] | None = None) -> None:
        """Check every (or the named) complete shard against the manifest; one FlameError
        naming the first bad shard. Cheap: headers, sizes and keys, no vectors."""
        for name in self.shards if names is None else names:
            self._shard(name)

    def array(self, name: str) -> np.ndarray:
        """The shard's raw [N, K, D] array (float16 or int8) as a read-only memory map."""
        return self._shard(name).array

    def scales(self, name: str) -> np.ndarray | None:
        """[N, K] float32 scales (int8 stores), else None."""
        return self._shard(name).scale

    def keys(self, name: str) -> list[str]:
        """The shard's keys in row order (read from its keys file each call)."""
        keys = self._read_keys(name)
        self._shard(name)  # validated against the array
        return keys

    def index(self, name: str) -> KeyIndex:
        """key -> row for one shard (`.get(key)`, `key in`, `[key]`)."""
        return self._shard(name).index

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
        shard = self._shard(name)
        out = np.asarray(shard.array[sel], dtype=np.float32)
        if shard.scale is not None:
            scale = np.asarray(shard.scale[sel], dtype=np.float32)
            out *= scale[..., None]
            finite = np.isfinite(scale).all()  # int8 values are finite: the scales decide
        else:
            finite = np.isfinite(out).all()
        if not finite:
            n_bad = int((~np.isfinite(out).all(axis=-1)).sum())
            raise self._bad(name, f"{n_bad} of the vectors read hold NaN/inf")
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
                n = len(cls(path).shards) if old.get("format") == FORMAT else 0
                raise FlameError(
                    f"store {path} was made with different settings ({diff}); choose another --out, "
                    f"or add --overwrite to DELETE its {n} complete shard{'s' if n != 1 else ''} and start again"
                )
            shutil.rmtree(path / "shards", ignore_errors=True)
            shutil.rmtree(path / ATTEMPTS, ignore_errors=True)
            fileio.remove_durable(mf)
        elif path.is_dir():
            ours = {".lock", ".lock-owner", "shards", ATTEMPTS}
            stray = [p.name for p in path.iterdir()
                     if p.name not in ours and not fileio.is_temporary_of(p.name, "manifest.json")]
            if stray:
                raise FlameError(
                    f"{path} exists and is not an embedding store (holds {stray[0]!r}); choose another --out"
                )
        (path / "shards").mkdir(parents=True, exist_ok=True)
        fileio.remove_stale_temporaries(path, "manifest.json")  # a killed create's
        with disk_errors(str(mf)):
            write_atomic(mf, manifest_bytes(manifest))
        return cls(path)

    def clean_temporaries(self) -> int:
        """Remove temporary files left by a killed writer. Call only while holding the lock."""
        n = 0
        for folder in (self.shard_dir, self.path / ATTEMPTS):
            for p in folder.glob("*" + TMP_SUFFIX):
                p.unlink(missing_ok=True)
                n += 1
        return n

    # ---- attempts (flame embed's record of shards tried and not completed) ------------
    def attempts(self) -> dict[str, dict]:
        """name -> {"attempts": n, "error": last error or None (interrupted)}."""
        out = {}
        for p in sorted((self.path / ATTEMPTS).glob("*.json")):
            try:
                record = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = {}
            out[p.name[: -len(".json")]] = record if isinstance(record, dict) else {}
        return out

    def record_attempt(self, name: str, error: str | None = None) -> None:
        """Note (durably) that shard `name` is being tried (`error` None) or failed with `error`."""
        folder = self.path / ATTEMPTS
        folder.mkdir(exist_ok=True)
        n = self._attempt_count(name) + (error is None)  # a start counts; its failure updates it
        record = json.dumps({"attempts": n, "error": error}, ensure_ascii=False) + "\n"
        with disk_errors(f"{folder / name}.json"):
            write_atomic(folder / f"{name}.json", record)

    def _attempt_count(self, name: str) -> int:
        try:
            return int(json.loads((self.path / ATTEMPTS / f"{name}.json").read_text()).get("attempts", 0))
        except (OSError, ValueError, AttributeError, TypeError):
            return 0

    def clear_attempt(self, name: str) -> None:
        fileio.remove_durable(self.path / ATTEMPTS / f"{name}.json")

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
