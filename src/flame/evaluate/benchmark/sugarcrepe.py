"""SugarCrepe (EVAL.md 3.1) as CLIP_benchmark reads it: COCO `val2017/` and one JSON object per
subset (`<subset>.json`, keyed by string indices that may skip numbers), each entry an image
`filename` with its `caption` and `negative_caption`.

    flame eval --benchmark sugarcrepe --dataset sugar-crepe --model M

ROOT holds `val2017/` and the seven subset files, either at its top (CLIP_benchmark's layout) or
in `data/` (the RAIVNLab/sugar-crepe repository as cloned, with val2017 beside it). One result per
subset in CLIP_benchmark's shape (`dataset` = `sugar_crepe/<subset>`, `acc` = `text_acc`,
`image_acc` trivially 1: one image per item), then one per category (Replace, Swap, Add): the
micro-average over its subsets (RAIVNLab/sugar-crepe issue #3), `dataset` = `sugar_crepe/<category>`.
A tie between caption and negative counts as correct (CLIP_benchmark's argmax) and is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flame.errors import FlameError
from flame.evaluate.benchmark import selection as S
from flame.evaluate.benchmark.base import Benchmark, Options, first_dir, not_this, present, read_json

NAME = "sugarcrepe"
SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
CATEGORIES = {"replace": ("replace_obj", "replace_att", "replace_rel"), "swap": ("swap_obj", "swap_att"),
              "add": ("add_obj", "add_att")}
FIELDS = ("filename", "caption", "negative_caption")
METRICS = ("acc", "text_acc", "image_acc")  # CLIP_benchmark's, in its order
LAYOUT = "val2017/ (the COCO val2017 images) and the subset files " + ", ".join(f"{s}.json" for s in SUBSETS) + \
         " (in ROOT or ROOT/data/)"


@dataclass
class Subset:
    name: str
    images: list[int]  # per item, its index into SugarCrepeData.images
    captions: list[str]
    negatives: list[str]


@dataclass
class SugarCrepeData:
    root: Path
    images: list[Path]  # the distinct images, first-seen order
    subsets: list[Subset]
    record: dict  # what --allow-missing left out


def _entries(path: Path) -> list[tuple[str, str, str]]:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise FlameError(f"{path} must hold a JSON object of items keyed by index (SugarCrepe's format)")
    out = []
    for key, e in raw.items():  # the keys' order, whatever numbers they skip (as CLIP_benchmark lists them)
        if not isinstance(e, dict) or not all(isinstance(e.get(f), str) for f in FIELDS):
            raise FlameError(f"{path}: item {key!r} needs the strings {', '.join(FIELDS)}")
        out.append((e["filename"], e["caption"], e["negative_caption"]))
    return out


def read(root: Path, opts: Options) -> SugarCrepeData:
    images_dir = first_dir(root, "val2017")
    ann = next((d for d in (root, root / "data") if any((d / f"{s}.json").is_file() for s in SUBSETS)), None)
    if images_dir is None or ann is None:
        raise not_this(root, NAME, LAYOUT)
    absent = [f"{s}.json" for s in SUBSETS if not (ann / f"{s}.json").is_file()]
    if absent:
        raise FlameError(f"{ann} lacks {', '.join(absent)}: {NAME} is reported on all seven subsets")
    files: dict[str, int] = {}
    raw = []
    for s in SUBSETS:
        entries = _entries(ann / f"{s}.json")
        raw.append((s, entries))
        for filename, _, _ in entries:
            files.setdefault(filename, len(files))
    paths = [images_dir / f for f in files]
    keep, record = present(paths, NAME, opts)
    kept = {i: j for j, i in enumerate(keep)}
    subsets = []
    for s, entries in raw:
        rows = [(kept[files[f]], c, n) for f, c, n in entries if files[f] in kept]
        subsets.append(Subset(s, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
    return SugarCrepeData(root, [paths[i] for i in keep], subsets, record)


def evaluate(model, data: SugarCrepeData, opts: Options) -> list[dict]:
    texts = S.encode_texts(model, [t for s in data.subsets for t in (*s.captions, *s.negatives)], opts)
    vec = S.image_vectors(model, data.root, NAME, data.images, opts)
    base = {"model": str(getattr(model, "source", None) or "in-memory"), "task": S.TASK, "language": "en",
            "prompts": S.PROMPTS, "truncated": texts.truncated}
    per_subset = {}
    for s in data.subsets:
        image_index = torch.tensor(s.images, dtype=torch.long).view(-1, 1)
        text_index = torch.tensor([[texts.index[c], texts.index[n]] for c, n in zip(s.captions, s.negatives)],
                                  dtype=torch.long).view(-1, 2)
        per = S.score(vec.vectors, texts.vectors, image_index, text_index)
        readable = vec.ok[image_index[:, 0]]
        per_subset[s.name] = (per, readable, image_index[:, 0])
    results = []
    for s in data.subsets:
        results.append(_result(base, f"sugar_crepe/{s.name}", [per_subset[s.name]], data.record))
    for cat, members in CATEGORIES.items():
        r = _result(base, f"sugar_crepe/{cat}", [per_subset[m] for m in members], data.record)
        results.append({**r, "average": "micro", "subsets": list(members)})
    return results


def _result(base: dict, dataset: str, parts: list, record: dict) -> dict:
    """One result over the items of `parts` ((per-item scores, readable, image index) per subset)."""
    per = {k: torch.cat([p[0][k] for p in parts]) for k in S.KEYS}
    readable = torch.cat([p[1] for p in parts])
    used = torch.cat([p[2][p[1]] for p in parts]).unique().numel()
    unreadable = torch.cat([p[2][~p[1]] for p in parts]).unique().numel()
    metrics, ties = S.summary(per, METRICS, readable)
    n = int(readable.sum())
    return {"dataset": dataset, **base, "metrics": metrics, "items": n, "images": int(used), "texts": 2 * n,
            "ties": ties, "skipped_images": int(unreadable), **record}


BENCHMARKS = (
    Benchmark(NAME, "sugar-crepe", LAYOUT,
              "CLIP_benchmark image_caption_selection: caption vs negative per COCO val2017 image, long set; "
              "acc per subset (ties correct, counted) and the Replace/Swap/Add micro-averages",
              read, evaluate),
)
