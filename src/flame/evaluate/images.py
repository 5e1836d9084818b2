"""Image vectors of an evaluation split: decoded and preprocessed in DataLoader workers with the
model's evaluation transform, encoded in batches, cached on disk.

An image that cannot be read or decoded is skipped and counted (`ok` is False for it), never
fatal here (the task decides how many it accepts: flame.evaluate.task_names.MAX_UNREADABLE). Files are
read by flame.data.images.read_image_file (regular files only, size-capped), tar members only
under the same cap (`member_problem`).

The cache (`$FLAME_CACHE/images/KEY.pt`) is keyed by the model's weight fingerprint, the dataset
(resolved path, the images it lists, every file's size and mtime), the split, what is computed
(`embed` = L2-normalised image embeddings, `features` = pooled tower features) and the
preprocessing (size, mean, std): a changed model, dataset or transform never reads stale vectors.
Names that are not UTF-8 (bytes from an old camera or a Windows zip) are keyed by their bytes.
Entries are written with flame.fileio.write_atomic (a temporary unique to the writer): two jobs
filling one entry at once both succeed, and a reader sees a whole entry or none.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from flame.data.images import MAX_IMAGE_BYTES, as_rgb, open_image, read_image_file
from flame.errors import FlameError, first_line
from flame.evaluate.datasets import IMAGE_EXTS, TAR_ERRORS, EvalDataset, Item, member_problem
from flame.fileio import remove_stale_temporaries, write_atomic
from flame.weights import load_torch

log = logging.getLogger("flame.evaluate")

KINDS = ("embed", "features")


def default_cache_dir() -> Path:
    from flame.llm import cache_dir

    return cache_dir() / "images"


# errors that say nothing about the image: too many open files, out of memory, try again
TEMPORARY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR}
BAD, OK, TEMP = 0, 1, 2  # what a decode gives: unreadable (cached as such), read, or a passing failure


def temporary(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno in TEMPORARY)


def _decode(data: bytes | str, transform: Callable, size: int) -> tuple[torch.Tensor, int]:
    """(image, OK) or (blank, BAD) for an image that cannot be read or decoded, or (blank, TEMP)
    when it failed for a passing reason (EMFILE, ENOMEM, MemoryError): that one is skipped in
    this run but never cached as unreadable."""
    try:
        if not isinstance(data, bytes):
            data = read_image_file(data)  # regular files only, size-capped
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image(data) as img:
                img.load()
                return transform(as_rgb(img)), OK
    except Exception as e:  # unreadable, undecodable, truncated, too large, or a transform that fails on it
        return torch.zeros(3, size, size), TEMP if temporary(e) else BAD


class FileImages(torch.utils.data.Dataset):
    def __init__(self, items: list[Item], transform: Callable, size: int):
        self.files = [it.file for it in items]
        self.transform, self.size = transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image, ok = _decode(self.files[i], self.transform, self.size)
        return i, image, ok


class TarImages(torch.utils.data.IterableDataset):
    """The images of webdataset shards; DataLoader worker w reads shards w, w+W, ..."""

    def __init__(self, items: list[Item], transform: Callable, size: int):
        super().__init__()
        self.index = {(it.shard, it.key): i for i, it in enumerate(items)}
        self.shards = list(dict.fromkeys(it.shard for it in items))
        self.transform, self.size = transform, size

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[w::n]:
            done = set()
            try:
                with tarfile.open(shard, "r:*") as tf:
                    for m in tf:
                        base = m.name.rsplit("/", 1)[-1]
                        key, _, ext = base.partition(".")
                        i = self.index.get((shard, m.name[: len(m.name) - len(base)] + key))
                        if not m.isfile() or ext.lower() not in IMAGE_EXTS or i is None or i in done:
                            continue
                        done.add(i)
                        if member_problem(m, MAX_IMAGE_BYTES):  # never read into memory
                            yield i, torch.zeros(3, self.size, self.size), False
                            continue
                        data = tf.extractfile(m).read(MAX_IMAGE_BYTES)
                        image, ok = _decode(data, self.transform, self.size)
                        yield i, image, ok
            except (*TAR_ERRORS, MemoryError) as e:
                log.warning("cannot read %s: %s (its remaining images are counted as unreadable)", shard, e)
                if temporary(e):  # a passing failure: the split is then not cached
                    yield -1, torch.zeros(3, self.size, self.size), TEMP


def _worker_init(_):
    torch.set_num_threads(1)


@dataclass
class SplitVectors:
    vectors: torch.Tensor  # float32 [N, D]; rows of unreadable images are zero
    ok: torch.Tensor  # bool [N]

    @property
    def skipped(self) -> int:
        return int((~self.ok).sum())


def cache_key(model, ds: EvalDataset, split: str, kind: str) -> str:
    items = ds.items(split)
    refs = "\n".join(f"{it.file or it.shard}#{it.key or ''}" for it in items)
    refs = hashlib.sha256(refs.encode("utf-8", "surrogateescape")).hexdigest()  # names as their bytes
    desc = {
        "model": model.fingerprint,
        "dataset": str(Path(ds.path).resolve()),
        "split": split,
        "kind": kind,
        "items": refs,
        "files": ds.stamp(),
        "preprocess": [model.image_size, list(model.mean), list(model.std)],
    }
    if getattr(model, "precision", "fp32") != "fp32":  # bf16/tf32 vectors (CUDA): not fp32 ones' entry
        desc["precision"] = model.precision
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(path: Path, n: int) -> SplitVectors | None:
    """The cached vectors at `path`, or None: a missing entry is computed, a damaged one
    recomputed with a warning (never fatal)."""
    if not path.is_file():
        return None
    try:
        saved = load_torch(path, "image cache", mmap=True)  # mapped: read as the probe streams it
        vectors, ok = saved["vectors"], saved["ok"]
        if not (isinstance(vectors, torch.Tensor) and isinstance(ok, torch.Tensor) and len(vectors) == len(ok) == n):
            raise FlameError(f"image cache {path} does not hold {n} vectors")
    except (FlameError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable image cache (it is recomputed): %s", first_line(e))
        return None
    return SplitVectors(vectors, ok)


@torch.no_grad()
def split_vectors(
    model,
    ds: EvalDataset,
    split: str = "test",
    kind: str = "embed",
    batch_size: int = 64,
    workers: int = 2,
    cache_dir: str | Path | None | bool = None,
    progress: bool = True,
) -> SplitVectors:
    """Vectors of every image of `split` (`kind`: "embed" or "features"). `cache_dir=False`
    disables the disk cache (training-time evaluation: the weights change every time)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    items = ds.items(split)
    path = None
    if cache_dir is not False:
        folder = Path(cache_dir) if cache_dir else default_cache_dir()
        path = folder / f"{cache_key(model, ds, split, kind)}.pt"
        cached = _read_cache(path, len(items))
        if cached is not None:
            return cached
    size = model.image_size
    transform = model.transform()
    data = (TarImages if ds.format == "wds" else FileImages)(items, transform, size)
    kwargs = {"worker_init_fn": _worker_init, "prefetch_factor": 4} if workers > 0 else {}
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers, **kwargs)
    encode = model.encode_image if kind == "embed" else model.image_features
    vectors: torch.Tensor | None = None
    ok = torch.zeros(len(items), dtype=torch.bool)
    bar = None
    if progress:
        from flame.progress import progress as progress_

        bar = progress_(total=len(items), unit="img", desc=f"{ds.name} {split} images")
    passing = 0
    for idx, images, status in loader:
        passing += int((status == TEMP).sum())
        keep = idx >= 0  # -1: a tar shard that failed for a passing reason
        idx, images, status = idx[keep], images[keep], status[keep]
        if not len(idx):
            continue
        out = encode(images.to(model.device)).float().cpu()
        if vectors is None:
            vectors = torch.zeros(len(items), out.shape[1])
        vectors[idx] = out
        ok[idx] = status == OK
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    if vectors is None:
        vectors = torch.zeros(len(items), 0)
    vectors[~ok] = 0
    if path is not None and passing:
        log.warning("%s %s: %d image(s) failed for a passing reason (too many open files or out of memory); "
                    "they are skipped in this run and the vectors are not cached", ds.name, split, passing)
    elif path is not None:
        write_cache(path, vectors, ok)
    return SplitVectors(vectors, ok)


def write_cache(path: Path, vectors: torch.Tensor, ok: torch.Tensor) -> bool:
    """Save an entry through flame.fileio.write_atomic (torch.save straight into the writer's own
    temporary: no copy in memory). The cache is an optimisation: a full or read-only cache folder
    is one warning, and the vectors are used all the same."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, path.name)  # left by killed writers of this entry
        write_atomic(path, lambda f: torch.save({"vectors": vectors, "ok": ok}, f))
        return True
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        log.warning("image vectors not cached (%s): the evaluation goes on without the cache", first_line(e))
        return False
