"""Reading a photo index: the query (scored block by block, top k kept as it goes) and the
inspection helpers. A query reads the log (shard names and dead rows), memory-maps the shards
and looks up only the paths it returns."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from flame.errors import FlameError, first_line
from flame.search.entries import Entries, read_entries, read_legacy, read_stats

KIND = "flame-image-index"
BLOCK = 65536  # rows read at a time when scoring a query, at most ...
BLOCK_BYTES = 8 << 20  # ... and at most this many bytes of float32 vectors (409 rows at D 5120)
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


def shown(rel: str) -> str:
    """A photo path as text anyone can print: bytes of a name that is not UTF-8 (kept in the
    path as surrogate escapes, as os.listdir gives them) appear as \\xNN."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _reader(index: Path, model=None) -> tuple[object, Entries]:
    """-> (store, entries) of an index; with `model`, its fingerprint must match."""
    from flame.store import EmbeddingStore

    if not (index / "manifest.json").is_file():
        raise FlameError(f"no search index at {index}; make one with: flame search index PHOTOS --model MODEL")
    store = EmbeddingStore(index)
    if store.manifest.get("kind") != KIND:
        raise FlameError(f"{index} is not a flame search index")
    if model is not None and store.manifest.get("model", {}).get("fingerprint") != model.fingerprint:
        raise FlameError(f"index {index} was built with another model; rerun flame search index with this --model")
    entries = read_entries(index)
    if entries is None:  # format 1 (flame 0.1), read as it is
        legacy = read_legacy(index, store)
        entries = legacy[0] if legacy else Entries()
    return store, entries


def _reading(index: Path, fn):
    try:
        return fn()
    except (FlameError, KeyError, OSError, IndexError) as e:
        raise FlameError(f"index {index} is incomplete or changed while reading it ({first_line(e)}); "
                         "rerun the command") from e


def _live_rows(store, entries: Entries):
    """(shard, live rows) in commit order."""
    for name in entries.shards:
        n = store.array(name).shape[0]
        yield name, np.flatnonzero(~entries.dead(name, n))


def index_entries(index: Path) -> dict[str, dict]:
    """path -> {size, mtime_ns, shard, row} of every live photo (inspection and tests; this
    holds every path in memory, a query never does)."""
    store, entries = _reader(Path(index))

    def read():
        out = {}
        for name, rows in _live_rows(store, entries):
            keys = store.keys(name)
            stat = read_stats(store.path, name, len(keys))
            for row in rows.tolist():
                out[keys[row]] = {"size": int(stat[row, 0]), "mtime_ns": int(stat[row, 1]), "shard": name, "row": row}
        return dict(sorted(out.items()))

    return _reading(index, read)


def load_index(index: Path, model=None) -> tuple[list[str], np.ndarray, Path | None]:
    """-> (relative paths sorted, float32 [N, D] vectors, the photo folder): every vector in
    memory (for inspection and tests). With `model`, its fingerprint must match."""
    store, entries = _reader(Path(index), model)

    def read():
        rels, vecs = [], []
        for name, rows in _live_rows(store, entries):
            keys = store.keys(name)
            rels.extend(keys[r] for r in rows.tolist())
            vecs.append(store.get(name, rows)[:, 0] if len(rows) else np.empty((0, store.dim), np.float32))
        order = sorted(range(len(rels)), key=rels.__getitem__)
        stacked = np.concatenate(vecs) if vecs else np.empty((0, store.dim), np.float32)
        return [rels[i] for i in order], stacked[order]

    rels, vecs = _reading(index, read)
    return rels, vecs, Path(entries.root) if entries.root else None


def _top(store, entries: Entries, q: np.ndarray, k: int) -> tuple[list[tuple[float, str, int]], int]:
    """-> ([(score, shard, row)] best first, live photos), block by block: memory is one
    block of vectors plus k candidates, whatever the index's size."""
    step = max(1, min(BLOCK, BLOCK_BYTES // (4 * store.dim)))
    best_s = np.empty(0, np.float32)
    best_at: list[tuple[str, int]] = []
    total = 0
    for name, rows in _live_rows(store, entries):
        total += len(rows)
        for s in range(0, len(rows), step):
            block = rows[s : s + step]
            scores = store.get(name, block)[:, 0] @ q
            keep = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
            best_s = np.concatenate([best_s, scores[keep]])
            best_at += [(name, int(block[i])) for i in keep]
            if len(best_s) > k:
                sel = np.argpartition(-best_s, k - 1)[:k]
                best_s, best_at = best_s[sel], [best_at[i] for i in sel]
    return [(float(sc), sh, r) for sc, (sh, r) in zip(best_s, best_at)], total


def search(model, index: Path, query: str, k: int = 10, prompts: str | None = None):
    """-> (prompt set used, [(score, path)] best first, photos in the index, photo folder).
    Scores are cosine similarities, computed block by block from the stored vectors."""
    store, entries = _reader(Path(index), model)
    if not entries.shards:
        raise FlameError(f"index {index} holds no photos")
    prompts = prompts or default_prompts(query)
    q = model.encode_text([query], prompts=prompts)[0].numpy().astype(np.float32)

    def read():
        top, total = _top(store, entries, q, k)
        keys = {sh: store.keys(sh) for sh in {sh for _, sh, _ in top}}
        hits = sorted(((sc, keys[sh][r]) for sc, sh, r in top), key=lambda h: (-h[0], h[1]))
        return hits, total

    hits, total = _reading(index, read)
    if not total:
        raise FlameError(f"index {index} holds no photos")
    return prompts, hits, total, Path(entries.root) if entries.root else None
