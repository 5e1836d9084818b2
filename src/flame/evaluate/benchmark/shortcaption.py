"""Short-caption retrieval through CLIP_benchmark's `zeroshot_retrieval` (EVAL.md section 4): COCO 5k
and Flickr30k 1k (Karpathy test), read in CLIP_benchmark's webdataset layout as
clip-benchmark/wds_mscoco_captions and wds_flickr30k are downloaded.

Every caption is its own T2I query; an image scores I2T@k when any of its captions is in its top
k; k in 1, 5, 10 by `torch.topk` (CLIP_benchmark's ranking); the long prompt set; captions capped
at CONTEXT_LENGTH tokens with the BOS counted (CLIP_benchmark's `LLMTokenizer` default).
Captions are read as CLIP_benchmark reads them: the sample's `txt` split with `str.splitlines`,
nothing stripped, and a caption's own newline left as the writer escaped it (the two characters
`\\n`: CLIP_benchmark never unescapes it). How many captions an image has is counted, not assumed.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from flame.errors import FlameError, first_line
from flame.evaluate.benchmark.base import CLIP_BENCHMARK_CAP, Benchmark, Options, not_this, present, read_text
from flame.evaluate.benchmark.retrieval import RetrievalSet, retrieve
from flame.evaluate.datasets import IMAGE_EXTS, MAX_TEXT_BYTES, TAR_ERRORS, Item, member_problem

CONTEXT_LENGTH = CLIP_BENCHMARK_CAP
PROMPTS = "long"
KS = (1, 5, 10)
LAYOUT = "{folder}/ in CLIP_benchmark's wds layout: test/nshards.txt, test/0.tar, ... and dataset_type.txt (retrieval)"


def _shard_samples(shard: Path) -> dict[str, dict]:
    """key -> {"txt": str, "image": bool} for the samples of one shard, in tar order; a `txt`
    that is not UTF-8 is refused in one line (webdataset decodes it strictly)."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard, "r:*") as tf:
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                stem, _, ext = base.partition(".")
                ext = ext.lower()
                if not m.isfile() or not (ext == "txt" or ext in IMAGE_EXTS):
                    continue
                s = samples.setdefault(m.name[: len(m.name) - len(base)] + stem, {})
                if ext in IMAGE_EXTS:
                    s["image"] = True
                    continue
                problem = member_problem(m, MAX_TEXT_BYTES)
                if problem:
                    raise FlameError(f"{shard}: member {m.name!r} {problem}; the shard is refused")
                data = tf.extractfile(m).read(MAX_TEXT_BYTES)
                try:
                    s["txt"] = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise FlameError(f"{shard}: member {m.name!r} is not UTF-8 text (byte {e.start}): captions are "
                                     "read as UTF-8") from None
    except TAR_ERRORS as e:
        raise FlameError(f"cannot read {shard} (truncated or corrupt?): {first_line(e) or type(e).__name__}") from None
    return samples


def read_wds_retrieval(root: Path, name: str, folder: str, opts: Options) -> RetrievalSet:
    """CLIP_benchmark's retrieval wds layout at ROOT (or ROOT/folder): every shard's samples, an
    image and a `txt` of captions each."""
    layout = LAYOUT.format(folder=folder)
    base = next((b for b in (root, root / folder) if (b / "test" / "nshards.txt").is_file()), None)
    if base is None:
        raise not_this(root, name, layout)
    kind_file = base / "dataset_type.txt"
    kind = read_text(kind_file).strip().lower() if kind_file.is_file() else None
    if kind != "retrieval":
        raise not_this(base, name, layout + f" (dataset_type.txt {'says ' + repr(kind) if kind else 'is missing'})")
    try:
        n = int(read_text(base / "test" / "nshards.txt").strip())
    except ValueError:
        raise FlameError(f"{base / 'test' / 'nshards.txt'} must hold the number of shards") from None
    items, captions, owner, found = [], [], [], []
    for shard in (base / "test" / f"{i}.tar" for i in range(n)):
        if not shard.is_file():
            raise FlameError(f"{base / 'test'} lists {n} shards but {shard.name} is missing")
        for key, s in _shard_samples(shard).items():
            if "txt" not in s:
                raise FlameError(f"{shard}: sample {key!r} has an image but no txt of captions")
            found.append(bool(s.get("image")))
            lines = s["txt"].splitlines()  # CLIP_benchmark: map_tuple(transform, str.splitlines)
            items.append(Item(shard=str(shard), key=key))
            captions.extend(lines)
            owner.extend([len(items) - 1] * len(lines))
    refs = [f"{it.shard}#{it.key}" for it in items]
    have = {r for r, ok in zip(refs, found, strict=True) if ok}
    keep, record = present(refs, name, opts, exists=have.__contains__)  # a sample without its image
    index = {old: new for new, old in enumerate(keep)}
    kept = [t for t, o in enumerate(owner) if o in index]
    return RetrievalSet(base, name, [items[i] for i in keep], [captions[t] for t in kept],
                        [index[owner[t]] for t in kept], fmt="wds", record=record)


def evaluate(model, pairs: RetrievalSet, opts: Options) -> list[dict]:
    return [retrieve(model, pairs, opts, prompts=PROMPTS, ks=KS, context_length=CONTEXT_LENGTH)]


def _benchmark(name: str, folder: str, what: str) -> Benchmark:
    return Benchmark(name, folder, LAYOUT.format(folder=folder),
                     f"{what}: every caption a T2I query, I2T by any caption, R@1/5/10 by torch.topk, long set, "
                     "cap 512 (CLIP_benchmark zeroshot_retrieval)",
                     lambda root, opts: read_wds_retrieval(root, name, folder, opts), evaluate)


BENCHMARKS = (
    _benchmark("coco", "wds_mscoco_captions", "Karpathy test, 5,000 images, their captions counted"),
    _benchmark("flickr30k", "wds_flickr30k", "Karpathy test, 1,000 images x 5 captions"),
)
