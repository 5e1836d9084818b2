"""Winoground (EVAL.md 3.2) as facebook/winoground distributes it: `examples.jsonl` (some copies:
`metadata.jsonl`) with `images/ex_<id>_img_<n>.png` (fields `image_0`/`image_1` are the stems),
or the later parquet files (`data/test-*.parquet`, image columns holding the PNG bytes).

    flame eval --benchmark winoground --dataset winoground --model M

ROOT is the dataset repository (`data/` inside it) or that `data/` folder. Images are RGBA PNGs
among others; they are decoded as every evaluation image is (flame.data.images.as_rgb: RGB, the
alpha channel dropped, as open_clip's transform does). Texts use the long set (the release did;
the captions are short, so a length rule would pick the raw one).

One result: the paper's strict `text_score`, `image_score`, `group_score` and CLIP_benchmark's
argmax `text_acc`, `image_acc`, `acc` (a tie goes to index 0), with the ties counted.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from flame.errors import FlameError
from flame.evaluate.benchmark import selection as S
from flame.evaluate.benchmark.base import Benchmark, Options, not_this, present, read_jsonl

NAME = "winoground"
TABLES = ("examples.jsonl", "metadata.jsonl")
FIELDS = ("image_0", "image_1", "caption_0", "caption_1")
METRICS = ("text_score", "image_score", "group_score", "text_acc", "image_acc", "acc")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LAYOUT = ("data/examples.jsonl (or metadata.jsonl) with data/images/ex_<id>_img_<n>.png (data/images.zip "
          "unpacked), or data/test-*.parquet")


@dataclass
class WinogroundData:
    root: Path
    ids: list
    captions: list[tuple[str, str]]
    images: list[tuple[Path, Path]] | None  # the jsonl form: the two image files per example
    parquet: list[Path] | None  # the parquet form: the files holding the image bytes
    record: dict


def _folders(root: Path) -> list[Path]:
    return [d for d in (root, root / "data") if d.is_dir()]


def _image(folder: Path, stem: str) -> Path:
    return folder / (stem if stem.lower().endswith(IMAGE_SUFFIXES) else f"{stem}.png")


def read(root: Path, opts: Options) -> WinogroundData:
    table = next((d / t for d in _folders(root) for t in TABLES if (d / t).is_file()), None)
    parquet = sorted(p for d in _folders(root) for p in d.glob("*.parquet"))
    if table is not None and ((table.parent / "images").is_dir() or not parquet):
        return _read_jsonl(root, table, opts)
    if parquet:
        return _read_parquet(root, parquet)
    raise not_this(root, NAME, LAYOUT)


def _read_jsonl(root: Path, table: Path, opts: Options) -> WinogroundData:
    folder = table.parent / "images"
    if not folder.is_dir() and (table.parent / "images.zip").is_file():
        raise FlameError(f"{table.parent / 'images.zip'} is not unpacked: unzip it there (it holds "
                         "images/ex_<id>_img_<n>.png)")
    rows = read_jsonl(table)
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not all(isinstance(r.get(f), str) for f in FIELDS):
            raise FlameError(f"{table} line {n}: an example needs the strings {', '.join(FIELDS)}")
    if not rows:
        raise FlameError(f"{table} holds no examples")
    pairs = [(_image(folder, r["image_0"]), _image(folder, r["image_1"])) for r in rows]
    keep, record = present([p for pair in pairs for p in pair], NAME, opts)
    found = set(keep)
    whole = [e for e in range(len(rows)) if 2 * e in found and 2 * e + 1 in found]  # both images there
    return WinogroundData(root, [rows[e].get("id", e) for e in whole],
                          [(rows[e]["caption_0"], rows[e]["caption_1"]) for e in whole],
                          [pairs[e] for e in whole], None, record)


def _read_parquet(root: Path, files: list[Path]) -> WinogroundData:
    """The text columns only (the images are read when evaluated)."""
    import pyarrow.parquet as pq

    ids, captions = [], []
    for f in files:
        try:
            names = pq.read_schema(f).names
            lacks = [c for c in FIELDS if c not in names]
            if lacks:
                raise FlameError(f"{f} is not a Winoground parquet file: it lacks {', '.join(lacks)}")
            cols = pq.read_table(f, columns=[c for c in ("id", "caption_0", "caption_1") if c in names]).to_pydict()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise FlameError(f"cannot read {f}: {str(e).splitlines()[0] if str(e) else e}") from None
        ids += cols.get("id") or list(range(len(ids), len(ids) + len(cols["caption_0"])))
        captions += list(zip(cols["caption_0"], cols["caption_1"]))
    if not captions or not all(isinstance(c, str) for pair in captions for c in pair):
        raise FlameError(f"{files[0].parent}: the parquet files hold no examples with string captions")
    return WinogroundData(root, ids, captions, None, files, {})


def _unpack(files: list[Path], folder: Path) -> list[tuple[Path, Path]]:
    """The parquet form's image bytes as files (the evaluation image path reads files)."""
    import pyarrow.parquet as pq

    out, n = [], 0
    for f in files:
        cols = pq.read_table(f, columns=["image_0", "image_1"]).to_pydict()
        for a, b in zip(cols["image_0"], cols["image_1"]):
            pair = []
            for k, v in enumerate((a, b)):
                data = v.get("bytes") if isinstance(v, dict) else v
                p = folder / f"{n}_img_{k}"
                p.write_bytes(data or b"")  # none: an unreadable image, counted
                pair.append(p)
            out.append((pair[0], pair[1]))
            n += 1
    return out


def evaluate(model, data: WinogroundData, opts: Options) -> list[dict]:
    texts = S.encode_texts(model, [c for pair in data.captions for c in pair], opts)
    with tempfile.TemporaryDirectory(prefix="flame-winoground-") as tmp:
        pairs = data.images if data.images is not None else _unpack(data.parquet, Path(tmp))
        if len(pairs) != len(data.captions):
            raise FlameError(f"{data.root}: {len(pairs)} image pairs for {len(data.captions)} caption pairs")
        # the parquet form's files live only for this run: not cached
        vec = S.image_vectors(model, data.root, NAME, [p for pair in pairs for p in pair], opts,
                              cache=data.images is not None)
    n = len(data.captions)
    image_index = torch.arange(2 * n).view(n, 2)
    text_index = torch.tensor([[texts.index[a], texts.index[b]] for a, b in data.captions],
                              dtype=torch.long).view(-1, 2)
    per = S.score(vec.vectors, texts.vectors, image_index, text_index)
    readable = vec.ok.view(n, 2).all(dim=1)
    metrics, ties = S.summary(per, METRICS, readable)
    kept = int(readable.sum())
    return [{"dataset": NAME, "model": str(getattr(model, "source", None) or "in-memory"), "task": S.TASK,
             "language": "en", "metrics": metrics, "prompts": S.PROMPTS, "examples": kept, "images": 2 * kept,
             "texts": 2 * kept, "truncated": texts.truncated, "ties": ties, "skipped_images": vec.skipped,
             **data.record}]


BENCHMARKS = (
    Benchmark(NAME, "winoground", LAYOUT,
              "CLIP_benchmark image_caption_selection: 2 images x 2 captions per example, long set; the paper's "
              "strict text/image/group scores and CLIP_benchmark's argmax ones, ties counted",
              read, evaluate),
)
