"""Long-caption retrieval as the release's scripts run it (EVAL.md section 1): ShareGPT4V-1k,
Urban-1k, DCI and DOCCI, each read as distributed.

Shared protocol: 1:1 pairs (caption i belongs to image i, paired by order alone), the long prompt
set, captions capped at CONTEXT_LENGTH tokens with the BOS counted (the scripts'
`model.text.max_length`), R@1 only in both directions by argmax (a tie goes to the lower index;
ties are counted).
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

from flame.errors import FlameError
from flame.evaluate.benchmark.base import (
    RELEASE_CAP,
    Benchmark,
    Options,
    not_this,
    present,
    read_json,
    read_jsonl,
    read_text,
)
from flame.evaluate.benchmark.retrieval import RetrievalSet, retrieve
from flame.evaluate.datasets import Item

CONTEXT_LENGTH = RELEASE_CAP
PROMPTS = "long"
KS = (1,)

SHAREGPT4V_JSON = "share-captioner_coco_lcs_sam_1246k_1107.json"
SHAREGPT4V_RECORDS = 1000  # the first records in file order (json.load(f)[:1000])
READ_BYTES = 1 << 20  # the ShareGPT4V array is streamed: only the records used are parsed


def _pairs(root: Path, name: str, images: list[Path], captions: list[str], opts: Options) -> RetrievalSet:
    """1:1 pairs, every image present (or, with --allow-missing, the pairs whose image is)."""
    keep, record = present(images, name, opts)
    return RetrievalSet(root, name, [Item(file=str(images[i])) for i in keep], [captions[i] for i in keep],
                        list(range(len(keep))), record=record)


def evaluate(model, pairs: RetrievalSet, opts: Options) -> list[dict]:
    return [retrieve(model, pairs, opts, prompts=PROMPTS, ks=KS, context_length=CONTEXT_LENGTH, first_max=True)]


# ---- ShareGPT4V-1k ---------------------------------------------------------------------------
def first_records(path: Path, n: int) -> list:
    """The first `n` elements of the JSON array in `path`, parsed as the file streams in (the full
    file holds ~1.25M records; `json.load(f)[:n]` would parse them all)."""
    decoder, text_decoder = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    out, buf, pos, started, offset = [], "", 0, False, 0
    with open(path, "rb") as f:
        while len(out) < n:
            chunk = f.read(READ_BYTES)
            try:
                buf = buf[pos:] + text_decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise FlameError(f"{path} is not UTF-8 text (byte {offset + e.start}): benchmark files are read "
                                 "as UTF-8") from None
            offset, pos = offset + len(chunk), 0
            while len(out) < n:
                while pos < len(buf) and (buf[pos].isspace() or (started and buf[pos] == ",")):
                    pos += 1
                if not started and pos < len(buf):
                    if buf[pos] != "[":
                        raise FlameError(f"{path} is not a JSON array of records")
                    started, pos = True, pos + 1
                    continue
                if pos < len(buf) and buf[pos] == "]":
                    return out
                try:
                    record, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if chunk:  # maybe cut by the read: read more
                        break
                    raise FlameError(f"{path} is not valid JSON: {e}") from None
                out.append(record)
                pos = end
            if not chunk:
                break
    return out


def _sharegpt4v_caption(path: Path, n: int, record) -> tuple[str, str]:
    try:
        image, caption = record["image"], record["conversations"][1]["value"]
        if isinstance(image, str) and isinstance(caption, str):
            return image, caption.replace("\n", " ")
    except (KeyError, IndexError, TypeError):
        pass
    raise FlameError(f"{path}: record {n} has no `image` and `conversations[1][\"value\"]` strings")


def _sharegpt4v_image(data: Path, rel: str) -> Path:
    """data/rel; a copy that flattened `sam/images/` to `sam/` is read there."""
    p = data / rel
    if not p.is_file() and rel.startswith("sam/images/"):
        flat = data / "sam" / rel[len("sam/images/"):]
        if flat.is_file():
            return flat
    return p


def read_sharegpt4v(root: Path, opts: Options) -> RetrievalSet:
    data = next((d for d in (root, root / "data") if (d / SHAREGPT4V_JSON).is_file()), None)
    if data is None:
        raise not_this(root, "sharegpt4v-1k", SHAREGPT4V.layout)
    path = data / SHAREGPT4V_JSON
    records = first_records(path, SHAREGPT4V_RECORDS)
    if len(records) < SHAREGPT4V_RECORDS:
        raise FlameError(f"{path} holds {len(records)} records; ShareGPT4V-1k is its first {SHAREGPT4V_RECORDS}")
    pairs = [_sharegpt4v_caption(path, i, r) for i, r in enumerate(records)]
    images = [_sharegpt4v_image(data, rel) for rel, _ in pairs]
    return _pairs(data, "sharegpt4v-1k", images, [c for _, c in pairs], opts)


# ---- Urban-1k --------------------------------------------------------------------------------
def _stem_order(p: Path) -> tuple:
    return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem)


def first_line(path: Path) -> str:
    """`readlines()[0]` of a text file opened as the release opens it (universal newlines): the
    first line with its newline, if it has one."""
    text = read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    if not text:
        raise FlameError(f"{path} is empty: an Urban-1k caption file holds its caption on the first line")
    return text[: text.index("\n") + 1] if "\n" in text else text


def read_urban(root: Path, opts: Options) -> RetrievalSet:
    base = next((b for b in (root, root / "Urban1k") if (b / "image").is_dir() and (b / "caption").is_dir()), None)
    if base is None:
        raise not_this(root, "urban-1k", URBAN.layout)
    files = sorted((p for p in (base / "caption").iterdir() if p.suffix == ".txt" and p.is_file()), key=_stem_order)
    if not files:
        raise FlameError(f"{base / 'caption'} holds no .txt caption files: expected {URBAN.layout}")
    images = [base / "image" / f"{p.stem}.jpg" for p in files]  # paired by stem, never by two sorts
    return _pairs(base, "urban-1k", images, [first_line(p) for p in files], opts)


# ---- DCI -------------------------------------------------------------------------------------
_DCI_SPLIT = re.compile(r"\n|</s>|\.")


def dci_caption(short: str, extra: str) -> str:
    """short + "\\n" + extra, split on newlines, `</s>` and every period, pieces stripped, empty
    ones dropped, joined with ". " (decimals split too: `3.5 m` -> `3. 5 m`, as the release does)."""
    pieces = (p.strip() for p in _DCI_SPLIT.split(short + "\n" + extra))
    return ". ".join(p for p in pieces if p)


def read_dci(root: Path, opts: Options) -> RetrievalSet:
    base = next((b for b in (root, root / "densely_captioned_images") if (b / "splits.json").is_file()
                 and (b / "annotations").is_dir()), None)
    if base is None:
        raise not_this(root, "dci", DCI.layout)
    splits = read_json(base / "splits.json")
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise FlameError(f"{base / 'splits.json'} must map split names to lists of annotation file names")
    images, captions = [], []
    for name in (n for files in splits.values() for n in files):  # every split, in the order stored
        path = base / "annotations" / str(name)
        if not path.is_file():
            raise FlameError(f"{base / 'splits.json'} lists {name}, which is not in {base / 'annotations'}")
        ann = read_json(path)
        if not (isinstance(ann, dict) and all(isinstance(ann.get(k), str) for k in
                                              ("image", "short_caption", "extra_caption"))):
            raise FlameError(f"{path} lacks `image`, `short_caption` or `extra_caption` strings")
        images.append(base / "photos" / ann["image"])
        captions.append(dci_caption(ann["short_caption"], ann["extra_caption"]))
    return _pairs(base, "dci", images, captions, opts)


# ---- DOCCI -----------------------------------------------------------------------------------
DOCCI_FILE = "docci_descriptions.jsonlines"


def read_docci(root: Path, opts: Options) -> RetrievalSet:
    base = next((b for b in (root, root / "docci") if (b / DOCCI_FILE).is_file()), None)
    if base is None:
        raise not_this(root, "docci", DOCCI.layout)
    rows = [r for r in read_jsonl(base / DOCCI_FILE) if isinstance(r, dict) and r.get("split") == "test"]
    bad = next((r for r in rows if not (isinstance(r.get("image_file"), str)
                                        and isinstance(r.get("description"), str))), None)
    if bad is not None:
        raise FlameError(f"{base / DOCCI_FILE}: test row {bad.get('example_id')!r} lacks `image_file` or "
                         "`description` strings")
    # the tarball's images/ folder; a copy unpacked beside the descriptions is read there
    folder = base / "images" if (base / "images").is_dir() else base
    return _pairs(base, "docci", [folder / r["image_file"] for r in rows],
                  [r["description"].replace("\n", " ") for r in rows], opts)


SHAREGPT4V = Benchmark(
    "sharegpt4v-1k", "ShareGPT4V",
    f"{SHAREGPT4V_JSON} beside the ShareGPT4V data/ folders (sam/images/, coco/train2017/, llava/...)",
    "first 1,000 records, caption = conversations[1] (newlines as spaces), long set, cap 1024, R@1 by argmax",
    read_sharegpt4v, evaluate)
URBAN = Benchmark(
    "urban-1k", "Urban1k", "Urban1k/image/ and Urban1k/caption/ (k.jpg and k.txt)",
    "k.txt's first line with image/k.jpg (paired by stem), long set, cap 1024, R@1 by argmax",
    read_urban, evaluate)
DCI = Benchmark(
    "dci", "densely_captioned_images", "densely_captioned_images/ holding splits.json, annotations/ and photos/",
    "all three splits in splits.json order, short + extra caption re-split on newlines, </s> and periods, "
    "long set, cap 1024, R@1 by argmax",
    read_dci, evaluate)
DOCCI = Benchmark(
    "docci", "docci", f"{DOCCI_FILE} and images/ (docci_images.tar.gz unpacked)",
    "split == test rows in file order (5,000), description with newlines as spaces, long set, cap 1024, "
    "R@1 by argmax",
    read_docci, evaluate)

BENCHMARKS = (SHAREGPT4V, URBAN, DCI, DOCCI)
