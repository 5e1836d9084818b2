"""Building the photo index of `flame search` (format: see the package docstring and
`flame.search.entries`): the folder scan, the encoding run and its commits."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flame.data.images import IMAGE_EXTS, decode_or_blank
from flame.errors import FlameError
from flame.lock import FileLock
from flame.search.compact import collect_garbage, next_shard
from flame.search.entries import Entries, EntryWriter, read_entries, read_legacy, read_stats
from flame.search.query import KIND, shown

PHOTO_SUFFIXES = tuple("." + e for e in IMAGE_EXTS)  # jpg jpeg png webp bmp
INDEX_NAME = ".flame-index"
COMMIT_EVERY = 4096  # photos per shard: a killed run keeps every committed shard


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


def _not_an_index(index: Path, old: dict, rebuild: bool) -> FlameError:
    from flame.store import EmbeddingStore

    what = "its manifest.json is unreadable or of another kind"
    if old.get("format") == "flame-embeddings":
        try:
            n = len(EmbeddingStore(index).shards)
        except FlameError:
            n = 0
        what = f"it is a flame embed store with {n} complete shard{'s' if n != 1 else ''}"
    also = "; --rebuild only replaces a flame search index" if rebuild else ""
    return FlameError(f"{index} is not a flame search index ({what}){also}; nothing was removed, "
                      "choose another --index")


def _check_kind(index: Path, rebuild: bool) -> dict | None:
    """The index's manifest (None if it has none); refused unless this command made it."""
    mf = index / "manifest.json"
    if not mf.is_file():
        stray = sorted(p.name for p in index.iterdir() if p.name not in (".lock", ".lock-owner", "shards")) \
            if index.is_dir() else []
        if stray:
            raise FlameError(f"{index} is not a flame search index (it holds {stray[0]!r}); nothing was changed, "
                             "choose another --index")
        return None
    try:
        old = json.loads(mf.read_text())
    except (OSError, ValueError):
        old = {}
    old = old if isinstance(old, dict) else {}
    if old.get("kind") != KIND:
        raise _not_an_index(index, old, rebuild)
    return old


def _open_index(index: Path, model, rebuild: bool):
    """The index's store, created if new. Only an index this command made (kind KIND) is ever
    replaced by --rebuild; any other store or folder is refused before anything is removed."""
    from flame.store import EmbeddingStore

    old = _check_kind(index, rebuild)
    if old is not None:
        fingerprint = (old.get("model") or {}).get("fingerprint")
        if fingerprint != model.fingerprint and not rebuild:
            raise FlameError(
                f"index {index} was built with another model (fingerprint {fingerprint}, "
                f"this one {model.fingerprint}); pass --rebuild to replace it"
            )
        if rebuild:
            EntryWriter(index).clear()
    return EmbeddingStore.create(index, _manifest(model), overwrite=rebuild)


def build_index(
    photos: Path,
    model,
    index: Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    rebuild: bool = False,
    progress: bool = True,
    allow_empty: bool = False,
) -> IndexReport:
    """Encode the new or changed photos under `photos` into the index (see the module doc).
    A folder with no photo against an index that has some (an unmounted disk, a wrong path) is
    refused unless `allow_empty`: it would forget every photo."""
    photos = Path(photos)
    if not photos.is_dir():
        raise FlameError(f"{photos} is not a folder of photos")
    index = Path(index) if index is not None else photos / INDEX_NAME
    _check_kind(index, rebuild)  # before the lock file is made in someone else's folder (checked again under it)
    index.mkdir(parents=True, exist_ok=True)
    # one indexer per index at a time (flame.lock: the kernel drops the lock if the process dies)
    with FileLock(index / ".lock", busy=f"index {index} is being updated by another flame search index",
                  hint="wait for it"):
        return _update(photos, model, index, batch_size, workers, rebuild, progress, allow_empty)


class _Run:
    """One indexing run: the photos found, the entries before it, the live ones so far, the
    vectors not yet committed."""

    def __init__(self, photos: Path, store, found: dict[str, tuple[int, int]], entries: Entries):
        self.photos, self.store, self.found, self.entries = photos, store, found, entries
        self.writer = EntryWriter(store.path)
        self.report = IndexReport(photos=len(found))
        self.old: dict[str, tuple[str, int, int, int]] = {}  # path -> shard, row, size, mtime_ns
        self.stale: dict[str, list[int]] = {}  # rows to drop: older copies of one path
        self.keys: list[str] = []
        self.vectors: list[np.ndarray] = []

    def load(self) -> None:
        """The live rows before this run (a path in two shards: the newer one counts)."""
        complete = set(self.store.shards)
        for name in [n for n in self.entries.shards if n not in complete]:
            del self.entries.shards[name]  # named by the log but gone: its rows are re-encoded
        for name in self.entries.shards:
            keys = self.store.keys(name)
            stat = read_stats(self.store.path, name, len(keys))
            for row in np.flatnonzero(~self.entries.dead(name, len(keys))).tolist():
                rel = keys[row]
                if rel in self.old:
                    self.stale.setdefault(self.old[rel][0], []).append(self.old[rel][1])
                self.old[rel] = (name, row, int(stat[row, 0]), int(stat[row, 1]))

    def reuse(self) -> list[str]:
        """Keep the rows of unchanged photos; -> the photos to encode."""
        todo = [rel for rel, (size, mtime) in self.found.items()
                if (e := self.old.get(rel)) is None or (e[2], e[3]) != (size, mtime)]
        self.report.reused = len(self.found) - len(todo)
        self.report.removed = sum(rel not in self.found for rel in self.old)
        return todo

    def _drops(self, rels) -> dict[str, list[int]]:
        drops: dict[str, list[int]] = {}
        for rel in rels:
            e = self.old.pop(rel, None)
            if e is not None:
                drops.setdefault(e[0], []).append(e[1])
        return drops

    def _record(self, record: dict) -> None:
        self.writer.append(record)
        self.entries.apply(record)

    def commit(self) -> None:
        """A shard of the photos encoded so far, its stats, then one log line (the commit
        point: its rows live, the rows they replace dead). A killed run keeps it."""
        if not self.keys:
            return
        name = next_shard(self.store)
        self.store.write_shard(name, self.keys, np.concatenate(self.vectors)[:, None])
        self.writer.write_stats(name, np.array([self.found[rel] for rel in self.keys], dtype=np.int64))
        self._record({"add": name, "drop": self._drops(self.keys)})
        self.report.encoded += len(self.keys)
        self.keys.clear()
        self.vectors.clear()

    def finish(self) -> None:
        """Drop the rows of photos gone from the folder, or unreadable now, and older copies."""
        self.commit()
        drops = self._drops([rel for rel in self.old if rel not in self.found or rel in self.report.unreadable])
        for name, rows in self.stale.items():
            drops.setdefault(name, []).extend(rows)
        if drops:
            self._record({"drop": drops})
        self.writer.write_root(self.photos)

    def encode(self, model, todo: list[str], batch_size: int, workers: int, progress: bool) -> None:
        """Encode `todo` in DataLoader workers, committing every COMMIT_EVERY photos."""
        from flame.progress import progress as progress_

        loader = torch.utils.data.DataLoader(
            _Photos(self.photos, todo, model.transform(), model.image_size),
            batch_size=batch_size,
            num_workers=workers,
        )
        bar = progress_(total=len(todo), unit="photo", desc="index photos", enabled=progress)
        for idx, images, ok in loader:
            bad = [todo[int(i)] for i in idx[~ok]]
            self.report.unreadable.extend(bad)
            for rel in bad:
                bar.write(f"flame search: cannot read {shown(rel)} (skipped)", file=sys.stderr)
            if ok.any():
                self.vectors.append(model.encode_image(images[ok]).cpu().numpy())
                self.keys.extend(todo[int(i)] for i in idx[ok])
            bar.update(len(idx))
            if len(self.keys) >= COMMIT_EVERY:
                self.commit()
        bar.close()


def _entries(index: Path, store, writer: EntryWriter) -> tuple[Entries, dict | None]:
    """-> (the index's entries, a format-1 index's stats to convert, else None)."""
    entries = read_entries(index)
    if entries is not None:
        writer.repair()
        return entries, None
    legacy = read_legacy(index, store)
    if legacy is None:
        return Entries(), None
    return legacy


def _update(photos: Path, model, index: Path, batch_size: int, workers: int, rebuild: bool,
            progress: bool, allow_empty: bool) -> IndexReport:
    store = _open_index(index, model, rebuild)
    store.clean_temporaries()
    found = scan_photos(photos, skip=index)
    run = _Run(photos, store, found, Entries())
    run.entries, legacy = _entries(index, store, run.writer)
    if legacy is None:
        run.load()
    else:  # format 1 (files.json): read into memory, converted below, once the guard has passed
        _load_legacy(run, legacy)
    if not found and run.old and not allow_empty:
        raise FlameError(
            f"{photos} holds no photos but index {index} has {len(run.old):,}; nothing was changed (is the folder "
            "unmounted or the path wrong?); pass --allow-empty to forget them all"
        )
    if legacy is not None:
        run.writer.convert_legacy(run.entries, legacy, photos)
    todo = run.reuse()
    if todo:
        run.encode(model, todo, batch_size, workers, progress)
    run.finish()
    collect_garbage(store, run.entries, run.writer, COMMIT_EVERY)
    return run.report


def _load_legacy(run: _Run, stats: dict[str, np.ndarray]) -> None:
    """`_Run.load` for a format-1 index, from its files.json read into memory."""
    for name in run.entries.shards:
        keys = run.store.keys(name)
        for row in np.flatnonzero(~run.entries.dead(name, len(keys))).tolist():
            run.old[keys[row]] = (name, row, int(stats[name][row, 0]), int(stats[name][row, 1]))
