"""`flame search`: text-to-image search over your own photo folder with a trained FLAME model.

    flame search index PHOTOS --model RUN [--index DIR]
    flame search query "a long description ..." --model RUN [--index DIR] [-k 10] [--html FILE]

The index (default PHOTOS/.flame-index) is an embedding store (`flame.store`) with K = 1:

    manifest.json                 format flame-embeddings, kind flame-image-index, the model's
                                  weight fingerprint, D, the image transform
    shards/batch-NNNNNN.npy       fp16 vectors of the photos one indexing run encoded
    shards/batch-NNNNNN.keys.json their paths relative to PHOTOS
    files.json                    the live entries: path -> size, mtime_ns, shard, row. Written
                                  last and atomically: it is the commit point of a run

A rerun encodes only photos that are new or whose size or modification time changed, reuses
every other vector, and forgets deleted photos. Every COMMIT_EVERY photos a shard and files.json
are committed, so a killed run resumes from there. Shards left without live rows are removed and
mostly-dead shards are compacted. Unreadable photos are skipped and counted.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import html
import io
import json
import os
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flame.data.images import IMAGE_EXTS, open_image
from flame.errors import FlameError
from flame.fileio import write_atomic

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
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with open_image((self.root / self.rels[i]).read_bytes()) as im:
                    return i, self.transform(im), True
        except (OSError, ValueError, SyntaxError):  # unreadable, undecodable, truncated, too large
            return i, torch.zeros(3, self.size, self.size), False


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
    with _lock(index):
        return _update(photos, model, index, batch_size, workers, rebuild, progress)


@contextmanager
def _lock(index: Path):
    """One indexer per index at a time (an flock the kernel drops if the process dies)."""
    index.mkdir(parents=True, exist_ok=True)
    with open(index / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FlameError(f"index {index} is being updated by another flame search index; wait for it") from None
        except OSError:
            pass  # no flock on this filesystem: the user runs one indexer at a time
        yield


def _update(photos: Path, model, index: Path, batch_size: int, workers: int, rebuild: bool,
            progress: bool) -> IndexReport:
    store = _open_index(index, model, rebuild)
    store.clean_temporaries()
    found = scan_photos(photos, skip=index)
    old, _ = _read_files(index)
    shards = set(store.shards)
    report = IndexReport(photos=len(found))
    files: dict[str, dict] = {}
    todo: list[str] = []
    for rel, (size, mtime) in found.items():
        e = old.get(rel)
        if e and e.get("size") == size and e.get("mtime_ns") == mtime and e.get("shard") in shards:
            files[rel] = e
        else:
            todo.append(rel)
    report.reused = len(files)
    report.removed = sum(rel not in found for rel in old)
    keys: list[str] = []
    vectors: list[np.ndarray] = []

    def commit() -> None:
        """A shard of the photos encoded so far, then files.json: a killed run keeps them."""
        if keys:
            name = _next_shard(store)
            store.write_shard(name, keys, np.concatenate(vectors)[:, None])
            for row, rel in enumerate(keys):
                size, mtime = found[rel]
                files[rel] = {"size": size, "mtime_ns": mtime, "shard": name, "row": row}
            report.encoded += len(keys)
            keys.clear()
            vectors.clear()
        _write_files(index, dict(sorted(files.items())), photos)

    if todo:
        from tqdm import tqdm

        loader = torch.utils.data.DataLoader(
            _Photos(photos, todo, model.transform(), model.image_size),
            batch_size=batch_size,
            num_workers=workers,
        )
        bar = tqdm(total=len(todo), unit="photo", desc="index photos", disable=None if progress else True,
                   dynamic_ncols=True)
        for idx, images, ok in loader:
            bad = [todo[int(i)] for i in idx[~ok]]
            report.unreadable.extend(bad)
            for rel in bad:
                bar.write(f"flame search: cannot read {rel} (skipped)", file=sys.stderr)
            if ok.any():
                vectors.append(model.encode_image(images[ok]).cpu().numpy())
                keys.extend(todo[int(i)] for i in idx[ok])
            bar.update(len(idx))
            if len(keys) >= COMMIT_EVERY:
                commit()
        bar.close()
    commit()
    _collect_garbage(store, files, photos)
    return report


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
        raise FlameError(f"index {index} is incomplete or changed while reading it ({e}); rerun the command") from e


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


# ---------------------------------------------------------------------------------------
# HTML contact sheet
# ---------------------------------------------------------------------------------------
def _thumbnail(path: Path, size: int = 256) -> str | None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image(path.read_bytes()) as im:
                im = im.convert("RGB")
                im.thumbnail((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError, SyntaxError):
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def contact_sheet(query: str, prompts: str, hits: list[tuple[float, str]], photos: Path, model_name: str) -> str:
    """A self-contained HTML page: inline JPEG thumbnails, every text HTML-escaped."""
    e = html.escape
    cards = []
    for rank, (score, rel) in enumerate(hits, 1):
        thumb = _thumbnail(photos / rel)
        img = (f'<img src="data:image/jpeg;base64,{thumb}" alt="{e(rel)}">' if thumb
               else '<div class="missing">cannot read this photo</div>')
        cards.append(f'<figure>{img}<figcaption><b>#{rank}</b> {score:.4f}<br>{e(rel)}</figcaption></figure>')
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>flame search: {e(query)}</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}"
        ".grid{display:flex;flex-wrap:wrap;gap:12px}"
        "figure{margin:0;width:260px}img{max-width:256px;max-height:256px;display:block}"
        "figcaption{font-size:13px;word-break:break-all}.missing{width:256px;height:96px;background:#eee}"
        "</style></head><body>\n"
        f"<h1>flame search</h1><p><b>query:</b> {e(query)}</p>"
        f"<p>prompt set: {e(prompts)} &middot; model: {e(model_name)} &middot; {len(hits)} results</p>\n"
        f"<div class=\"grid\">\n" + "\n".join(cards) + "\n</div></body></html>\n"
    )


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="M",
                   help="run folder (its latest checkpoint) or checkpoint folder")
    p.add_argument("--index", type=Path, metavar="DIR",
                   help="index folder (default: PHOTOS/.flame-index; for query ./.flame-index)")
    p.add_argument("--device", default="auto", help="where the image tower runs (default: cuda if present, else cpu)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  flame search index ~/Photos --model runs/cc3m-b16\n"
        "  flame search query 'two children fly a red kite on a windy beach' --model runs/cc3m-b16 \\\n"
        "      --index ~/Photos/.flame-index -k 20 --html kite.html\n"
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("index", help="encode every photo under a folder (a rerun adds only new or changed ones)",
                       description="Encode every photo (jpg, jpeg, png, webp, bmp) under PHOTOS, recursively. "
                       "A rerun encodes only new or changed photos (size or modification time).")
    p.add_argument("photos", type=Path, metavar="PHOTOS", help="folder of photos")
    _model_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers decoding photos (default: min(4, CPUs))")
    p.add_argument("--rebuild", action="store_true", help="replace an index built with another model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    q = sub.add_parser("query", help="find the photos that best match a text",
                       description="Print the top matches for a text, best first, with cosine scores.")
    q.add_argument("text", help="the query: a phrase, a long description, any language the LLM reads")
    _model_args(q)
    q.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    q.add_argument("--prompts", default=None, metavar="raw|short|long|FILE",
                   help=f"prompt set for the query (default: long for more than one sentence, more than {LONG_WORDS} "
                   f"words or more than {LONG_CHARS} characters, else raw)")
    q.add_argument("--html", type=Path, metavar="FILE", help="also write a self-contained HTML contact sheet")
    q.add_argument("--llm", help="override the LLM spec recorded in the model (e.g. a local copy)")
    q.add_argument("--llm-device", help="where the LLM runs if a text must be encoded (default: cuda if present)")
    q.add_argument("--force-llm", action="store_true", help="accept an LLM whose weight fingerprint differs")
    q.add_argument("--cache-dir", type=Path, help="text-vector cache (default: $FLAME_CACHE/text)")


def run(args: argparse.Namespace) -> int:
    from flame.distributed import resolve_device
    from flame.model import FlameModel

    if args.action == "index":
        if not args.photos.is_dir():
            raise FlameError(f"{args.photos} is not a folder of photos")
        if args.batch_size < 1 or args.workers < 0:
            raise FlameError("--batch-size must be >= 1 and --workers >= 0")
        model = FlameModel.from_pretrained(args.model, device=resolve_device(args.device))
        index = args.index or args.photos / INDEX_NAME
        r = build_index(args.photos, model, index, args.batch_size, args.workers, args.rebuild,
                        progress=not args.no_progress)
        print(f"{r.photos} photos: {r.encoded} encoded, {r.reused} unchanged, {len(r.unreadable)} unreadable "
              f"(skipped), {r.removed} removed; index {index}")
        return 0
    if args.k < 1:
        raise FlameError("-k must be >= 1")
    model = FlameModel.from_pretrained(
        args.model, device=resolve_device(args.device), llm=args.llm, llm_device=args.llm_device,
        force_llm=args.force_llm, cache_dir=args.cache_dir,
    )
    index = args.index or Path(INDEX_NAME)
    prompts, hits, n, photos = search(model, index, args.text, args.k, args.prompts)
    print(f"{n} photos under {photos or index.parent}; query ({prompts} prompts): {args.text}")
    for rank, (score, rel) in enumerate(hits, 1):
        print(f"{rank:>4}  {score:7.4f}  {rel}")
    if args.html:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.html, contact_sheet(args.text, prompts, hits, photos or index.parent, str(args.model)))
        print(f"wrote {args.html}")
    return 0
