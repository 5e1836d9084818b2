"""The photo index of `flame search` (format: see the package docstring) and the query over it."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flame.data.images import IMAGE_EXTS, decode_or_blank
from flame.errors import FlameError, first_line
from flame.fileio import write_atomic
from flame.lock import FileLock

PHOTO_SUFFIXES = tuple("." + e for e in IMAGE_EXTS)  # jpg jpeg png webp bmp
INDEX_NAME = ".flame-index"
KIND = "flame-image-index"
FILES = "files.json"
COMMIT_EVERY = 4096  # photos per shard: a killed run keeps every committed shard
BLOCK = 65536  # vectors read at a time when scoring a query
# Default prompt set for a query (FLAME.md section 6): the long set for long or multi-sentence
# text, the raw set for short text.
LONG_WORDS = 20
LONG_CHARS = 120
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f]\s*(?=\S)")


def default_prompts(text: str) -> str:
    """"long" when the text has more than one sentence, more than LONG_WORDS words or more
    than LONG_CHARS characters (for scripts without spaces); otherwise "raw"."""
    text = text.strip()
    multi = _SENTENCE_END.search(text) is not None
    return "long" if multi or len(text.split()) > LONG_WORDS or len(text) > LONG_CHARS else "raw"


# ---------------------------------------------------------------------------------------
# the photo folder
# ---------------------------------------------------------------------------------------
def scan_photos(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Relative POSIX path -> (size, mtime_ns) of every photo under `root`, recursively,
    leaving out hidden folders (the index lives in one) and `skip`."""
    found: dict[str, tuple[int, int]] = {}
    skip = skip.resolve() if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != skip)
        for name in sorted(filenames):
            if name.lower().endswith(PHOTO_SUFFIXES):
                path = here / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                found[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return found


class _Photos(torch.utils.data.Dataset):
    """Decodes and preprocesses in DataLoader workers; a photo that fails gives ok=False. Only
    JPEG/PNG/WEBP/BMP under flame.data.images.MAX_PIXELS are decoded (`open_image`)."""

    def __init__(self, root: Path, rels: list[str], transform, size: int):
        self.root, self.rels, self.transform, self.size = root, rels, transform, size

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int):
        image, ok = decode_or_blank(self.root / self.rels[i], self.transform, self.size)
        return i, image, ok


# ---------------------------------------------------------------------------------------
# the index
# ---------------------------------------------------------------------------------------
@dataclass
class IndexReport:
    photos: int = 0  # photos found in the folder
    encoded: int = 0  # new or changed photos encoded this run
    reused: int = 0  # unchanged photos whose vectors were kept
    removed: int = 0  # entries of photos no longer in the folder
    unreadable: list[str] = field(default_factory=list)


def _manifest(model) -> dict:
    return {
        "format": "flame-embeddings",
        "version": 1,
        "kind": KIND,
        "model": {"fingerprint": model.fingerprint},
        "image": {"size": model.image_size, "mean": list(model.mean), "std": list(model.std)},
        "facets": ["image"],
        "k": 1,
        "dim": model.tower_config.embed_dim,
        "dtype": "fp16",
        "normalized": True,
    }


def _read_files(index: Path) -> tuple[dict[str, dict], str | None]:
    """-> (path -> entry, the photo folder the paths are relative to)."""
    path = index / FILES
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text())
        return dict(data["files"]), data.get("root")
    except (OSError, ValueError, KeyError, TypeError):
        return {}, None  # unreadable bookkeeping: everything is re-encoded, nothing is lost


def _write_files(index: Path, files: dict[str, dict], root: Path) -> None:
    data = {"version": 1, "root": str(Path(root).resolve()), "files": files}
    write_atomic(index / FILES, json.dumps(data, ensure_ascii=False) + "\n")


def _open_index(index: Path, model, rebuild: bool):
    from flame.store import EmbeddingStore

    mf = index / "manifest.json"
    if mf.is_file() and not rebuild:
        try:
            old = json.loads(mf.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("kind") != KIND:
            raise FlameError(f"{index} is not a flame search index; choose another --index")
        if old.get("model", {}).get("fingerprint") != model.fingerprint:
            raise FlameError(
                f"index {index} was built with another model (fingerprint {old.get('model', {}).get('fingerprint')}, "
                f"this one {model.fingerprint}); pass --rebuild to replace it"
            )
    if rebuild and mf.is_file():
        (index / FILES).unlink(missing_ok=True)
    return EmbeddingStore.create(index, _manifest(model), overwrite=rebuild)


def _per_photo(store, files: dict[str, dict], rels: list[str], fn, shape: tuple[int, ...]) -> np.ndarray:
    """fn(float32 vectors [n, D]) for the photos `rels`, read shard by shard in sorted row blocks
    of BLOCK, so memory stays bounded however large the index is."""
    out = np.empty((len(rels), *shape), dtype=np.float32)
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for i, rel in enumerate(rels):
        e = files[rel]
        by_shard.setdefault(e["shard"], []).append((i, e["row"]))
    for shard, pairs in by_shard.items():
        dst = np.array([p[0] for p in pairs])
        rows = np.array([p[1] for p in pairs])
        order = np.argsort(rows)
        dst, rows = dst[order], rows[order]
        for s in range(0, len(rows), BLOCK):
            out[dst[s : s + BLOCK]] = fn(store.get(shard, rows[s : s + BLOCK])[:, 0])
    return out


def _vectors(store, files: dict[str, dict], rels: list[str]) -> np.ndarray:
    """float32 [len(rels), D] gathered from the shards named in `files`."""
    return _per_photo(store, files, rels, lambda v: v, (store.dim,))


def _next_shard(store) -> str:
    numbers = [int(n.split("-")[-1]) for n in store.shards if n.startswith("batch-") and n.split("-")[-1].isdigit()]
    return f"batch-{max(numbers, default=0) + 1:06d}"


def _collect_garbage(store, files: dict[str, dict], root: Path) -> None:
    """Remove shards no live entry points at; compact when most stored rows are dead."""
    live: dict[str, int] = {}
    for e in files.values():
        live[e["shard"]] = live.get(e["shard"], 0) + 1
    total = 0
    for name in store.shards:
        if name not in live:
            for p in store._shard_paths(name).values():
                p.unlink(missing_ok=True)
        else:
            total += store.array(name).shape[0]
    if len(live) > 1 and sum(live.values()) * 2 < total:
        rels = sorted(files)
        vecs = _vectors(store, files, rels)
        name = _next_shard(store)
        store.write_shard(name, rels, vecs[:, None])
        new = {rel: {**files[rel], "shard": name, "row": i} for i, rel in enumerate(rels)}
        _write_files(store.path, new, root)
        files.clear()
        files.update(new)
        _collect_garbage(store, files, root)


def build_index(
    photos: Path,
    model,
    index: Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    rebuild: bool = False,
    progress: bool = True,
) -> IndexReport:
    """Encode the new or changed photos under `photos` into the index (see the module doc)."""
    photos = Path(photos)
    if not photos.is_dir():
        raise FlameError(f"{photos} is not a folder of photos")
    index = Path(index) if index is not None else photos / INDEX_NAME
    index.mkdir(parents=True, exist_ok=True)
    # one indexer per index at a time (flame.lock: the kernel drops the lock if the process dies)
    with FileLock(index / ".lock", busy=f"index {index} is being updated by another flame search index",
                  hint="wait for it"):
        return _update(photos, model, index, batch_size, workers, rebuild, progress)


class _Run:
    """One indexing run: the photos found, the live entries so far, the vectors not yet committed."""

    def __init__(self, photos: Path, index: Path, store, found: dict[str, tuple[int, int]]):
        self.photos, self.index, self.store, self.found = photos, index, store, found
        self.report = IndexReport(photos=len(found))
        self.files: dict[str, dict] = {}
        self.keys: list[str] = []
        self.vectors: list[np.ndarray] = []

    def reuse(self, old: dict[str, dict]) -> list[str]:
        """Keep the entries of unchanged photos; -> the photos to encode."""
        shards = set(self.store.shards)
        todo: list[str] = []
        for rel, (size, mtime) in self.found.items():
            e = old.get(rel)
            if e and e.get("size") == size and e.get("mtime_ns") == mtime and e.get("shard") in shards:
                self.files[rel] = e
            else:
                todo.append(rel)
        self.report.reused = len(self.files)
        self.report.removed = sum(rel not in self.found for rel in old)
        return todo

    def commit(self) -> None:
        """A shard of the photos encoded so far, then files.json: a killed run keeps them."""
        if self.keys:
            name = _next_shard(self.store)
            self.store.write_shard(name, self.keys, np.concatenate(self.vectors)[:, None])
            for row, rel in enumerate(self.keys):
                size, mtime = self.found[rel]
                self.files[rel] = {"size": size, "mtime_ns": mtime, "shard": name, "row": row}
            self.report.encoded += len(self.keys)
            self.keys.clear()
            self.vectors.clear()
        _write_files(self.index, dict(sorted(self.files.items())), self.photos)

    def encode(self, model, todo: list[str], batch_size: int, workers: int, progress: bool) -> None:
        """Encode `todo` in DataLoader workers, committing every COMMIT_EVERY photos."""
        from tqdm import tqdm

        loader = torch.utils.data.DataLoader(
            _Photos(self.photos, todo, model.transform(), model.image_size),
            batch_size=batch_size,
            num_workers=workers,
        )
        bar = tqdm(total=len(todo), unit="photo", desc="index photos", disable=None if progress else True,
                   dynamic_ncols=True)
        for idx, images, ok in loader:
            bad = [todo[int(i)] for i in idx[~ok]]
            self.report.unreadable.extend(bad)
            for rel in bad:
                bar.write(f"flame search: cannot read {rel} (skipped)", file=sys.stderr)
            if ok.any():
                self.vectors.append(model.encode_image(images[ok]).cpu().numpy())
                self.keys.extend(todo[int(i)] for i in idx[ok])
            bar.update(len(idx))
            if len(self.keys) >= COMMIT_EVERY:
                self.commit()
        bar.close()


def _update(photos: Path, model, index: Path, batch_size: int, workers: int, rebuild: bool,
            progress: bool) -> IndexReport:
    store = _open_index(index, model, rebuild)
    store.clean_temporaries()
    run = _Run(photos, index, store, scan_photos(photos, skip=index))
    todo = run.reuse(_read_files(index)[0])
    if todo:
        run.encode(model, todo, batch_size, workers, progress)
    run.commit()
    _collect_garbage(store, run.files, photos)
    return run.report


def _reader(index: Path, model=None):
    """-> (store, files, photo folder) of an index; with `model`, its fingerprint must match."""
    from flame.store import EmbeddingStore

    if not (index / "manifest.json").is_file():
        raise FlameError(f"no search index at {index}; make one with: flame search index PHOTOS --model MODEL")
    store = EmbeddingStore(index)
    if store.manifest.get("kind") != KIND:
        raise FlameError(f"{index} is not a flame search index")
    if model is not None and store.manifest.get("model", {}).get("fingerprint") != model.fingerprint:
        raise FlameError(f"index {index} was built with another model; rerun flame search index with this --model")
    files, root = _read_files(index)
    return store, files, Path(root) if root else None


def _reading(index: Path, fn):
    try:
        return fn()
    except (FlameError, KeyError, OSError) as e:
        raise FlameError(f"index {index} is incomplete or changed while reading it ({first_line(e)}); "
                         "rerun the command") from e


def load_index(index: Path, model=None) -> tuple[list[str], np.ndarray, Path | None]:
    """-> (relative paths, float32 [N, D] vectors, the photo folder). With `model`, its
    fingerprint must match."""
    store, files, root = _reader(Path(index), model)
    rels = sorted(files)
    return rels, _reading(index, lambda: _vectors(store, files, rels)), root


def search(model, index: Path, query: str, k: int = 10, prompts: str | None = None):
    """-> (prompt set used, [(score, path)] best first, photos in the index, photo folder).
    Scores are cosine similarities, computed block by block from the stored vectors."""
    store, files, root = _reader(Path(index), model)
    rels = sorted(files)
    if not rels:
        raise FlameError(f"index {index} holds no photos")
    prompts = prompts or default_prompts(query)
    q = model.encode_text([query], prompts=prompts)[0].numpy()
    scores = _reading(index, lambda: _per_photo(store, files, rels, lambda v: v @ q, ()))
    top = np.argsort(-scores, kind="stable")[:k]
    return prompts, [(float(scores[i]), rels[i]) for i in top], len(rels), root
