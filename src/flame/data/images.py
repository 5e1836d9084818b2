"""Training data: webdataset image shards joined with the embedding store by (shard, key).

One `TrainStream` runs in every DataLoader worker of every rank and yields whole batches:
``{"images": uint8 [B,3,S,S], "texts": float16 [B,m,D], "keys": ["shard/key", ...], "state": {...}}``. Images stay
uint8 until they reach the device (`normalize_images`), which quarters host->device traffic.

- Splitting: logical worker g = rank * W + w of G = world * W reads shards ``perm[g::G]`` of
  an epoch's shard permutation; with fewer shards than G every worker reads every shard and
  keeps samples ``i % G == g`` (sample-level split). No sample is seen twice per epoch.
- Epochs: each worker's stream is infinite, shards are reshuffled every epoch from
  (seed, epoch); within a shard the order is the file order (crops and facet choices are
  random per visit).
- Randomness: the crop and the m facets of a sample come from an RNG seeded by
  (seed, epoch, shard, key), never from process RNG, so any worker layout and any resume
  sees the same values.
- Position: every batch carries its worker's (epoch, samples passed in that epoch). A resumed
  stream skips to that point (reading but not decoding the skipped samples), and DataLoader's
  strict round-robin over workers is restored by rotating logical worker ids (`rotate`).
- Weighted mixes (`StreamConfig.sources`, from `--data SHARDS::WEIGHT`): each worker instead
  draws with replacement, forever (`flame.data.mix.ResampledOrder`): every sample's source by
  weight, whole shards of that source uniformly. No split between workers (each draws its own
  sequence); the position adds the order's counters, so a resume continues it exactly.
- Samples whose key has no stored embedding, or whose image does not decode, are skipped and
  counted in the batch state (`missing`, `undecodable`); never fatal.

Tar reading is webdataset's (`tarfile_samples`).
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import stat
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from flame.data.draft import draft_scale, oriented_size, request_draft, scaled_box
from flame.data.memo import Memo
from flame.data.shards import expand_shards, shard_name, tar_keys  # tar_keys: the one key scanner, re-exported
from flame.errors import FlameError

log = logging.getLogger("flame.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
# The only decoders an image member may reach. A web-scraped `KEY.jpg` can hold anything PIL
# can open (EPS hands it to Ghostscript, and there are dozens of rarely used parsers): every
# other format is undecodable, skipped and counted.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Larger images are undecodable too (decompression bombs: a few KB of PNG can claim gigapixels;
# 64 MP is ~200 MB of RGB per data worker). PIL's own limit (89 MP) only warns below twice it.
MAX_PIXELS = 64 * 1024 * 1024
# Larger encoded images (files, tar members) are not read at all: a path naming /dev/zero, a
# 20 GB member or a sparse one is refused from its size, before any byte is read into memory.
MAX_IMAGE_BYTES = 256 * 1024 * 1024


class UndecodableImage(ValueError):
    """An image member that is not decoded (wrong format, too many pixels)."""


# --------------------------------------------------------------------------------------
# facet eligibility
# --------------------------------------------------------------------------------------
def eligible_facets(spec: str | Sequence[int] | None, manifest: dict) -> list[int]:
    """Which of the store's K facets may be sampled as positives.

    `spec`: None / "all"; prompt-set names, e.g. "long" or "short,long" (facets whose name
    is `SET/i` in the manifest); or indices "0,3,5" (ranges "1-7" allowed)."""
    names = list(manifest.get("facets") or [])
    k = int(manifest["k"])
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(k))
    if not isinstance(spec, str):
        idx = [int(i) for i in spec]
    else:
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if all(p.replace("-", "").isdigit() for p in parts):
            idx = []
            for p in parts:
                lo, _, hi = p.partition("-")
                idx.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        else:
            sets = {n.split("/")[0] for n in names}
            unknown = [p for p in parts if p not in sets]
            if unknown:
                raise FlameError(
                    f"--facets: prompt set {unknown[0]!r} is not in the store (it has {', '.join(sorted(sets))})"
                )
            idx = [i for i, n in enumerate(names) if n.split("/")[0] in parts]
    bad = [i for i in idx if not 0 <= i < k]
    if bad:
        raise FlameError(f"--facets: index {bad[0]} out of range for a store with K={k} facets")
    if not idx:
        raise FlameError("--facets selects no facets")
    return sorted(dict.fromkeys(idx))


def sample_seed(seed: int, epoch: int, shard: str, key: str) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + zlib.crc32(f"{shard}/{key}".encode())) & 0xFFFFFFFFFFFF


def choose_facets(rng: random.Random, eligible: Sequence[int], m: int) -> list[int]:
    return sorted(rng.sample(list(eligible), m))


def crop_box(rng: random.Random, width: int, height: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (torchvision's algorithm) drawn from `rng`: (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open (header only) an image of one of IMAGE_FORMATS with at most `max_pixels` pixels;
    anything else raises UndecodableImage before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's bomb warning: our own limit below decides
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:
            raise UndecodableImage(f"too many pixels ({e})") from None
        except OSError as e:  # UnidentifiedImageError: not one of IMAGE_FORMATS
            raise UndecodableImage(f"not a {'/'.join(IMAGE_FORMATS)} image ({e.__class__.__name__})") from None
    if img.width * img.height > max_pixels:
        raise UndecodableImage(f"{img.width}x{img.height} pixels is over the limit of {max_pixels:,}")
    return img


def read_image_file(path: str | Path, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of an image file: only a regular file (a symlink is followed to what it names,
    which must itself be a regular file) of at most `max_bytes`. A FIFO, a device (/dev/zero), a
    socket or a folder raises UndecodableImage at once, without blocking or reading."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UndecodableImage(f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise UndecodableImage(f"{path} holds {st.st_size:,} bytes, over the limit of {max_bytes:,}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while read
        raise UndecodableImage(f"{path} is over the limit of {max_bytes:,} bytes")
    return data


def as_rgb(img: Image.Image) -> Image.Image:
    """A decoded RGB image as it is meant to be seen: EXIF orientation applied (phone portraits
    stand up) and 16-bit greyscale (PNG modes I;16 / I) scaled to 8 bits rather than clipped."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block: the pixels as stored
        pass
    if img.mode in _WIDE_GREY:
        grey = np.asarray(img).astype(np.float64) * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


_WIDE_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def decode_or_blank(source: bytes | str | Path, transform, size: int) -> tuple[torch.Tensor, bool]:
    """`transform(image)` of encoded bytes or an image file, or (zeros [3, size, size], False)
    when it cannot be read or decoded: how evaluation and `flame search` treat a bad image
    (skipped and counted, never fatal), under the training stream's rules (`open_image`,
    `read_image_file`, `as_rgb`)."""
    try:
        data = source if isinstance(source, bytes) else read_image_file(source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image(data) as img:
                img.load()
                return transform(as_rgb(img)), True
    except Exception:  # unreadable, undecodable, truncated, too large, or a transform that fails on it
        return torch.zeros(3, size, size), False


def load_image(
    data: bytes, size: int, rng: random.Random | None, scale=(0.9, 1.0), max_pixels: int = MAX_PIXELS,
    reduce: bool = True,
) -> torch.Tensor:
    """Decode (`as_rgb`), random-resized-crop (or centre-resize when rng is None) -> uint8 [3, S, S].
    A JPEG is decoded at the smallest size its crop still covers with S x S pixels (`flame.data.draft`;
    `reduce=False`: always in full). Raises UndecodableImage (or PIL's error for a corrupt file) for
    what is not decoded."""
    return decode_full(data, size, rng, scale, max_pixels, reduce)[0]


def decode_full(
    data: bytes, size: int, rng: random.Random | None, scale=(0.9, 1.0), max_pixels: int = MAX_PIXELS,
    reduce: bool = True,
) -> tuple[torch.Tensor, Image.Image | None, tuple[int, int], bool]:
    """`load_image`, also returning the decoded RGB image when it was decoded at full size and
    stood up as its header said (else None; `flame.data.memo` keeps it), the full (oriented) size
    and whether the file is a JPEG."""
    img = open_image(data, max_pixels)
    jpeg = img.format == "JPEG"
    full = oriented_size(img)  # the crop is drawn from the full size, whatever the decode's scale
    saved = rng.getstate() if rng is not None else None
    box = _crop(rng, full, scale)
    drafted = request_draft(img, draft_scale(*full, box, size)) if reduce else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = as_rgb(img)
    if img.size != (-(-full[0] // drafted), -(-full[1] // drafted)):  # stood up otherwise than the header said
        if rng is not None:
            rng.setstate(saved)
        if drafted > 1:
            return decode_full(data, size, rng, scale, max_pixels, reduce=False)
        box = _crop(rng, img.size, scale)
    elif drafted > 1:
        box = scaled_box(box, full, img.size)
    whole = img if drafted == 1 and img.size == full else None  # a full decode, as the header said
    return _resized(img, size, box), whole, full, jpeg


def _resized(img: Image.Image, size: int, box) -> torch.Tensor:
    """The bicubic resize of `box` to size x size -> uint8 [3, S, S]."""
    pixels = np.asarray(img.resize((size, size), Image.BICUBIC, box=box), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def load_kept(memo: Memo, key: str, data: bytes, c: StreamConfig, rng: random.Random) -> torch.Tensor:
    """`load_image` for the training stream, from the full-size decode an earlier epoch kept in
    `memo` where the uncached path would decode at full size too (the same pixels: bit-identical)."""
    hit = memo.image(key)
    if hit is not None:
        rgb, full, jpeg = hit
        saved = rng.getstate()
        box = _crop(rng, full, c.crop_scale)
        if not (c.reduced_decode and jpeg and draft_scale(*full, box, c.image_size) > 1):
            return _resized(rgb, c.image_size, box)
        rng.setstate(saved)  # this crop is decoded at a reduced scale: the uncached path
    out, rgb, full, jpeg = decode_full(data, c.image_size, rng, c.crop_scale, c.max_pixels, c.reduced_decode)
    if rgb is not None:
        memo.keep(key, (rgb, full, jpeg), rgb.width * rgb.height)
    return out


def _crop(rng: random.Random | None, full: tuple[int, int], scale) -> tuple[int, int, int, int]:
    """The crop box (left, top, right, bottom) of an image of size `full`: the whole image without rng."""
    if rng is None:
        return 0, 0, full[0], full[1]
    left, top, w, h = crop_box(rng, full[0], full[1], scale)
    return left, top, left + w, top + h


def normalize_images(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                     std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,S,S] -> float32 normalised, on the images' device (mean/std: lists, or tensors
    already there, which cost no copy)."""
    mean_t = torch.as_tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean_t) / std_t


# --------------------------------------------------------------------------------------
# validation (before any training time is spent)
# --------------------------------------------------------------------------------------
def resolve_shards(specs: str | Sequence[str]) -> list[Path]:
    """The shards of a spec; a named file (or one of a brace range) that is missing is an
    error, not a silently smaller dataset (`expand_shards` checks it)."""
    return expand_shards(specs)


@dataclass
class DataCheck:
    shards: list[Path]
    usable: list[Path]  # shards whose name is in the store
    missing_shards: list[str] = field(default_factory=list)
    checked_keys: int = 0
    matched_keys: int = 0


def check_data(shards: Sequence[Path], store, probe: int = 3) -> DataCheck:
    """Join check between image shards and the store; raises FlameError when nothing joins."""
    have = set(store.shards)
    usable = [p for p in shards if shard_name(p) in have]
    missing = [shard_name(p) for p in shards if shard_name(p) not in have]
    if not usable:
        raise FlameError(
            f"no overlap between the {len(shards)} image shard(s) (e.g. {shard_name(shards[0])}) and the "
            f"store {store.path} ({len(have)} shard(s)); run flame embed on the same shards"
        )
    check = DataCheck(list(shards), usable, missing)
    for p in usable[:probe]:
        keys = tar_keys(p)
        index = store.index(shard_name(p))
        check.checked_keys += len(keys)
        check.matched_keys += sum(k in index for k in keys)
    if check.checked_keys and check.matched_keys == 0:
        raise FlameError(
            f"no overlap between shard keys and store keys (checked {check.checked_keys} keys in "
            f"{min(probe, len(usable))} shard(s), e.g. {shard_name(usable[0])}); was the store made from these shards?"
        )
    return check


# --------------------------------------------------------------------------------------
# the stream
# --------------------------------------------------------------------------------------
@dataclass
class StreamConfig:
    shards: list[str]  # paths
    store: str
    image_size: int
    batch_size: int
    m: int
    eligible: list[int]
    seed: int = 0
    crop_scale: tuple[float, float] = (0.9, 1.0)
    rank: int = 0
    world: int = 1
    positions: dict = field(default_factory=dict)  # logical worker -> [epoch, pos] (+ the mix's position)
    rotate: int = 0
    max_pixels: int = MAX_PIXELS  # larger images are skipped as undecodable
    sources: list[dict] | None = None  # a weighted mix (flame.data.mix): [{"shards": [paths], "weight": w}, ...]
    epoch_samples: int = 0  # with sources: the samples of one (reported) epoch
    reduced_decode: bool = True  # JPEGs decoded at the smallest size their crop allows (flame.data.draft)
    memo_bytes: int = 256 << 20  # a data set this small stays in memory per worker across epochs (flame.data.memo)


class _Batcher:
    """One stream's batch in the making and its skip counters."""

    def __init__(self, config: StreamConfig, store):
        self.config, self.store = config, store
        self.memo = Memo(config.shards, config.memo_bytes)
        self.have = set(store.shards)
        self.counts = {"missing": 0, "undecodable": 0, "samples": 0}
        self.batch: list[tuple[torch.Tensor, np.ndarray, str]] = []

    def add(self, sample: dict, visit: int) -> bool:
        """Decode one tar sample into the batch; False (counted) when it has no stored embedding
        or its image does not decode. `visit` (the epoch) seeds its crop and facets."""
        c, counts = self.config, self.counts
        key, url = sample.get("__key__"), sample.get("__url__", "")
        name = shard_name(Path(url))
        row = self.store.index(name).get(key) if name in self.have else None
        if row is None:
            counts["missing"] += 1
            return False
        data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        rng = random.Random(sample_seed(c.seed, visit, name, key))
        facets = choose_facets(rng, c.eligible, c.m)
        try:
            if data is None:
                raise ValueError("no image")
            img = load_kept(self.memo, f"{name}/{key}", data, c, rng)
        except Exception:
            counts["undecodable"] += 1
            return False
        self.batch.append((img, self.store.get(name, row, facets), f"{name}/{key}"))
        counts["samples"] += 1
        return True

    def emit(self, state: dict) -> dict:
        images, texts, keys = zip(*self.batch)
        self.batch = []
        return {
            "images": torch.stack(images),
            "texts": torch.from_numpy(np.stack(texts)).to(torch.float16),
            "keys": list(keys),
            "state": {**state, **self.counts},
        }


def worker_shards(order: list, g: int, G: int) -> tuple[list, int, int]:
    """(the shards data worker g of G reads, and which part of their samples it keeps: every
    `parts`-th from `part`). With at least G shards each worker reads its own and keeps all; with
    fewer, each shard is read only by the ~G/S workers that share it (not by every worker, which
    read the whole data G times per epoch), each keeping its share of that shard's samples."""
    if len(order) >= G:
        return order[g::G], 0, 1
    shard = g % len(order)
    return [order[shard]], g // len(order), len(range(shard, G, len(order)))


class TrainStream(torch.utils.data.IterableDataset):
    def __init__(self, config: StreamConfig):
        super().__init__()
        self.config = config

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.config.rotate) % info.num_workers, info.num_workers

    def __iter__(self) -> Iterator[dict]:
        from flame.store import EmbeddingStore

        c = self.config
        logical, workers = self._worker()
        g, G = c.rank * workers + logical, c.world * workers
        reader = _Batcher(c, EmbeddingStore(c.store))
        position = c.positions.get(logical, c.positions.get(str(logical), (0, 0)))
        if c.sources:
            yield from self._resampled(reader, logical, g, G, position)
        else:
            yield from self._epochs(reader, logical, g, G, position)

    def _epochs(self, reader: _Batcher, logical: int, g: int, G: int, position) -> Iterator[dict]:
        import webdataset as wds

        c = self.config
        shards = sorted(c.shards)
        epoch, skip = position[0], position[1]
        while True:
            order = list(shards)
            random.Random(c.seed * 1_000_003 + epoch).shuffle(order)
            mine, part, parts = worker_shards(order, g, G)
            pos = 0  # samples of this worker passed in this epoch
            used_this_epoch = 0
            stream = reader.memo.samples(mine, handler=wds.warn_and_continue)
            for i, sample in enumerate(stream):
                if i % parts != part:
                    continue
                pos += 1
                if pos <= skip or not reader.add(sample, epoch):
                    continue
                used_this_epoch += 1
                if len(reader.batch) == c.batch_size:
                    yield reader.emit({"worker": logical, "epoch": epoch, "pos": pos})
            if used_this_epoch == 0 and skip == 0:
                raise RuntimeError(
                    f"data worker {g} of {G} found no usable samples in its {len(mine)} shard(s) "
                    f"({reader.counts['missing']} without embeddings, {reader.counts['undecodable']} undecodable)"
                )
            epoch, skip = epoch + 1, 0

    def _resampled(self, reader: _Batcher, logical: int, g: int, G: int, position) -> Iterator[dict]:
        """The weighted mix (flame.data.mix): drawn with replacement, forever. The position is
        (epoch, samples drawn, generation, per source (shard draw, samples read)); the epoch is
        only reported (epoch_samples samples over every worker make one)."""
        from flame.data.mix import ResampledOrder

        c = self.config
        mix = list(position[2:])
        generation = mix[0] if mix else position[0]  # no mix state: a fresh sequence (start, or a new layout)
        order = ResampledOrder([s["shards"] for s in c.sources], [s["weight"] for s in c.sources], seed=c.seed,
                               generation=generation, worker=g, workers=G, position=mix[1:])
        unusable = 0
        for sample, _source, visit in order:
            if not reader.add(sample, visit):
                unusable += 1
                if unusable > 100_000:
                    raise RuntimeError(f"data worker {g} of {G} found no usable samples in 100,000 draws")
                continue
            unusable = 0
            if len(reader.batch) == c.batch_size:
                drawn = order.position()[0]
                epoch = generation + drawn * G // max(1, c.epoch_samples)
                yield reader.emit({"worker": logical, "epoch": epoch, "pos": drawn,
                                  "mix": [generation, *order.position()]})


def _worker_init(_):
    torch.set_num_threads(1)


def make_loader(config: StreamConfig, workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    kwargs = {}
    if workers > 0:
        kwargs = {"prefetch_factor": 4, "worker_init_fn": _worker_init, "persistent_workers": False}
    return torch.utils.data.DataLoader(
        TrainStream(config), batch_size=None, num_workers=workers, pin_memory=pin_memory, **kwargs
    )


__all__ = ["StreamConfig", "TrainStream", "check_data", "eligible_facets", "make_loader", "normalize_images",
           "resolve_shards"]
