"""Crossmodal-3600 (XM3600, EVAL.md 2.1) as distributed: `captions.jsonl` (one line per image:
`image/key`, `image/locale` and one object per language holding the parallel lists `caption`,
`caption/tokenized`, `caption/tokenized/lowercase`) and `images/<key>.jpg`.

ROOT may hold them itself or in `xm3600/` (CLIP_benchmark's layout); the images may sit one level
further down (`images/<folder>/<key>.jpg`, should the tarball have a top folder). Per language:
every image against **the first raw caption** of that language (`caption[0]`, as CLIP_benchmark's
annotation file takes it), the raw prompt set (its English wrapper around any language), I2T and
T2I recall@1 (the release's `--recall_k 1`) through the benchmark retrieval runner (CLIP_benchmark's
512-token caption cap, `truncated` and `ties` counted); one result per language and a `mean` entry,
the unweighted mean over the languages evaluated (its `truncated` and `ties` summed over them).
All 3,600 images are required (CLIP_benchmark only warns about missing ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from flame.errors import FlameError
from flame.evaluate.benchmark.base import CLIP_BENCHMARK_CAP, Benchmark, Options, not_this, present, read_jsonl
from flame.evaluate.benchmark.classification import short
from flame.evaluate.benchmark.retrieval import RetrievalSet
from flame.evaluate.benchmark.retrieval import retrieve as run_retrieval
from flame.evaluate.datasets import Item

# the 36 codes exactly as the release passes them (CLIP_benchmark's SUPPORTED_LANGUAGES)
XM3600_LANGUAGES = ("ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja ko mi nl no pl pt quz ro ru sv sw te th "
                    "tr uk vi zh").split()
XM3600_IMAGES = 3600
KEY = re.compile(r"[0-9a-fA-F]{16}")
LAYOUT = "captions.jsonl and images/<image/key>.jpg (in ROOT or ROOT/xm3600/)"
METRICS = ("image_retrieval_recall@1", "text_retrieval_recall@1")


@dataclass
class XM3600:
    path: Path  # the folder holding captions.jsonl (the image cache's key: one entry for every language)
    images: list[Path]
    captions: dict[str, list[str]]  # language -> caption[0] of each image, in the order of `images`
    record: dict = field(default_factory=dict)


def pick_languages(opts: Options) -> list[str]:
    if not opts.languages:
        return list(XM3600_LANGUAGES)
    unknown = [c for c in opts.languages if c not in XM3600_LANGUAGES]
    if unknown:
        raise FlameError(f"xm3600 has no language {unknown[0]!r}: its 36 codes are {' '.join(XM3600_LANGUAGES)}")
    return list(dict.fromkeys(opts.languages))


def _image_folder(data: Path, keys: list[str]) -> Path:
    """images/, or the one folder under it that holds the most of the images."""
    images = data / "images"
    if not images.is_dir():
        raise not_this(data, "xm3600", f"{LAYOUT}; there is no images/ beside captions.jsonl")
    candidates = [images, *sorted(d for d in images.iterdir() if d.is_dir())]
    sample = keys[:: max(1, len(keys) // 100)]
    return max(candidates, key=lambda d: sum((d / f"{k}.jpg").is_file() for k in sample))


def _first_caption(row: dict, lang: str, where: str) -> str:
    obj = row.get(lang)
    caps = obj.get("caption") if isinstance(obj, dict) else None
    if not isinstance(caps, list) or not caps or not isinstance(caps[0], str) or not caps[0].strip():
        raise FlameError(f"{where} has no {lang!r} caption (a {lang!r} object whose 'caption' list starts with a "
                         "caption)")
    return caps[0]


def read_xm3600(root: Path, opts: Options) -> XM3600:
    langs = pick_languages(opts)
    data = next((d for d in (root, root / "xm3600") if (d / "captions.jsonl").is_file()), None)
    if data is None:
        raise not_this(root, "xm3600", LAYOUT)
    table = data / "captions.jsonl"
    rows = read_jsonl(table)
    keys = []
    for n, row in enumerate(rows, 1):
        key = row.get("image/key") if isinstance(row, dict) else None
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise FlameError(f"{table} line {n} has no image/key of 16 hex digits")
        keys.append(key)
    if not keys:
        raise not_this(root, "xm3600", f"{LAYOUT}; its captions.jsonl is empty")
    folder = _image_folder(data, keys)
    keep, record = present([folder / f"{k}.jpg" for k in keys], "xm3600", opts)
    record.update(short("xm3600", len(keys), XM3600_IMAGES, opts))
    captions = {lang: [_first_caption(rows[i], lang, f"{table} image {keys[i]}") for i in keep] for lang in langs}
    return XM3600(data, [folder / f"{keys[i]}.jpg" for i in keep], captions, record)


def retrieve(model, data: XM3600, lang: str, opts: Options) -> dict:
    """One language through the benchmark retrieval runner: raw set, CLIP_benchmark's 512-token cap
    on the caption, recall@1 by torch.topk (CLIP_benchmark's), truncated captions and ties counted."""
    caps = data.captions[lang]
    pairs = RetrievalSet(data.path, "crossmodal3600", [Item(file=str(p)) for p in data.images], caps,
                         list(range(len(caps))), language=lang, record=data.record)
    return run_retrieval(model, pairs, opts, prompts="raw", ks=(1,), context_length=CLIP_BENCHMARK_CAP)


def evaluate_xm3600(model, data: XM3600, opts: Options) -> list[dict]:
    results = [retrieve(model, data, lang, opts) for lang in data.captions]
    mean = {k: sum(r["metrics"][k] for r in results) / len(results) for k in METRICS}
    results.append({"dataset": "crossmodal3600", "model": results[0]["model"], "task": "zeroshot_retrieval",
                    "language": "mean", "metrics": mean, "prompts": "raw", "languages": list(data.captions),
                    "images": results[0]["images"], "truncated": sum(r["truncated"] for r in results),
                    "ties": {k: sum(r["ties"][k] for r in results) for k in results[0]["ties"]}, **data.record})
    return results


BENCHMARKS = (
    Benchmark("xm3600", "xm3600", LAYOUT,
              "36 languages, each image against its first caption per language, raw set, I2T/T2I R@1; one result "
              "per language and their mean", read_xm3600, evaluate_xm3600),
)
