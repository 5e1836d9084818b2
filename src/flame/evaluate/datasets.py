"""Evaluation datasets in three formats, read into one description (`EvalDataset`).

(a) The CLIP_benchmark webdataset layout, as the published `wds_*` sets are downloaded:

        DIR/test/nshards.txt, DIR/test/0.tar, 1.tar, ...   (optionally DIR/train/... for linear probes)
        DIR/classnames.txt                                 one class name per line (classification)
        DIR/zeroshot_classification_templates.txt          one template per line with `{c}`
        DIR/dataset_type.txt                               `retrieval` for caption sets

    Samples hold a `webp`/`png`/`jpg`/`jpeg` image and a `cls` label (classification) or a `txt`
    with one caption per line (retrieval). A member is read only up to a size cap (MAX_TEXT_BYTES
    for `cls`/`txt`, flame.data.images.MAX_IMAGE_BYTES for images; GNU sparse members never): a
    shard with a bigger one, or one that is truncated or corrupt, is refused in one line.
(b) An image folder with one sub-folder per class (`DIR/CLASS/*.jpg`), optionally split into
    `DIR/train/CLASS/...` and `DIR/test/CLASS/...`. Class names are the folder names with `_`
    read as spaces, unless `DIR/classnames.txt` lists them (one per line, in sorted folder order);
    templates from `DIR/zeroshot_classification_templates.txt`. Listed: `.jpg .jpeg .png .webp .bmp`,
    the formats that are decoded (flame.data.images.IMAGE_FORMATS); TIFF and GIF are not read.
(c) A CSV or JSONL table (the file itself, or `DIR/captions.csv|jsonl`) with an image path column
    (`image`, `image_path`, `path`, `file`, `filename`; relative to the table's folder), a caption
    column (`caption`, `captions`, `text`, `txt`) holding one caption or a list (a JSON list in
    CSV), and optionally `language`/`lang`. Rows repeating an image add captions to it.

What is read (tables and folders alike): only regular files. A symlink is followed when it names
a regular file (checked on the opened file, so what is decoded is what was checked); a path
naming a device (`/dev/zero`), a FIFO, a socket or a folder is an unreadable image, skipped at
once and counted (flame.data.images.read_image_file). Labels must be 0 <= label < the number of
class names (MAX_UNNAMED_CLASSES without class names); an empty test split is refused
(`check_not_empty`) before anything runs on it.

Other languages (classification): see `classtexts.py`, which looks the class names up under
the dataset's CLIP_benchmark name (the folder name without `wds_`/`wds-` and `_test`, or
`name=`). Images are decoded later by `images.py`, in DataLoader workers.
"""

from __future__ import annotations

import csv
import io
import json
import lzma
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from flame.data.images import MAX_IMAGE_BYTES
from flame.errors import FlameError, first_line
from flame.evaluate.classtexts import class_texts, read_lines
from flame.evaluate.task_names import canonical_task

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
FILE_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}  # what open_image decodes (JPEG/PNG/WEBP/BMP)
UNREAD_IMAGE_EXTS = {".gif", ".tif", ".tiff"}  # named in the error when a folder holds only these
MAX_TEXT_BYTES = 1024 * 1024  # a `cls` / `txt` member
MAX_UNNAMED_CLASSES = 100_000  # the label bound of a set without class names
# what a truncated or corrupt (compressed) tar raises while it is read
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filepath", "filename")
CAPTION_COLUMNS = ("caption", "captions", "text", "txt")
LANGUAGE_COLUMNS = ("language", "lang")
TABLE_NAMES = ("captions.csv", "captions.jsonl")
FORMATS_HELP = (
    "expected (a) the CLIP_benchmark webdataset layout (test/nshards.txt, test/0.tar, ... with classnames.txt "
    "or dataset_type.txt), (b) an image folder with one sub-folder per class, or (c) a CSV/JSONL table of "
    "image paths and captions"
)


@dataclass
class Item:
    """One image: where it is (`file` path, or `shard` + `key` inside a tar) and what it shows."""

    file: str | None = None
    shard: str | None = None
    key: str | None = None
    label: int | None = None
    captions: list[str] = field(default_factory=list)


@dataclass
class EvalDataset:
    path: Path
    name: str  # used for the shipped multilingual class names and in results
    format: str  # "wds" | "folder" | "table"
    kind: str  # "classification" | "retrieval"
    splits: dict[str, list[Item]]
    language: str | None = None
    classnames: list[str] | None = None
    templates: list[str] | None = None
    template_error: str | None = None  # why templates are missing (raised only by zero-shot)
    languages: list[str | None] | None = None  # per test item, from a table's language column

    def items(self, split: str = "test") -> list[Item]:
        if split not in self.splits:
            raise FlameError(f"{self.path} has no {split!r} split (it has {', '.join(sorted(self.splits))})")
        return self.splits[split]

    def stamp(self) -> list:
        """Size and mtime of every file the dataset reads (for cache keys)."""
        files = sorted({it.shard or it.file for items in self.splits.values() for it in items})
        out = []
        for f in files:
            try:
                st = Path(f).stat()
                out.append([f, st.st_size, st.st_mtime_ns])
            except OSError:
                out.append([f, None, None])
        return out


# ------------------------------------------------------------------------------------------------
# format detection
# ------------------------------------------------------------------------------------------------
def load_dataset(path: str | Path, task: str | None = None, language: str | None = None, name: str | None = None,
                 templates: str | None = None) -> EvalDataset:
    """Read a dataset's description (labels, captions, class names, templates); no image is decoded.
    `templates`: a file of templates or the name of a template set shipped with clip-benchmark,
    used when the dataset brings none."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FlameError(f"dataset {path} does not exist")
    for _fmt, detect, reader in READERS:
        if detect(path):
            ds = reader(path)
            break
    else:
        raise FlameError(f"{path} is not an evaluation dataset: {FORMATS_HELP}{_unread_hint(path)}")
    ds.name = name or dataset_name(ds.path)
    if ds.kind == "retrieval":
        _select_language(ds, language)
    else:
        ds.language = language or "en"
        texts = class_texts(ds.path, ds.name, ds.language, ds.classnames, ds.templates, templates)
        ds.classnames, ds.templates, ds.template_error = texts.classnames, texts.templates, texts.error
    _check_contents(ds)
    if task is not None:
        _check_task(ds, task)
    return ds


def check_not_empty(ds: EvalDataset) -> None:
    """An empty test split is refused in one line (by `flame eval` before the model is loaded,
    and by `evaluate`); a description of an empty set still loads (its class names, templates)."""
    if not ds.splits.get("test"):
        what = "captioned images" if ds.kind == "retrieval" else "labelled images"
        raise FlameError(f"{ds.path}: the test split has no {what}; nothing to evaluate")


def _check_contents(ds: EvalDataset) -> None:
    """Out-of-range labels are refused, naming the sample."""
    if ds.kind != "classification":
        return
    n = len(ds.classnames) if ds.classnames else None
    bound = n if n is not None else MAX_UNNAMED_CLASSES
    for split, items in ds.splits.items():
        for it in items:
            if it.label is not None and not 0 <= it.label < bound:
                where = f"{it.shard} sample {it.key}" if it.shard else f"{it.file}"
                rule = (f"a label must be 0..{n - 1} ({n} class names)" if n is not None
                        else f"a label must be 0..{bound - 1} without class names")
                raise FlameError(f"{where} ({split}) has label {it.label}: {rule}")


def dataset_name(path: Path) -> str:
    """CLIP_benchmark's name for a downloaded set: `wds_imagenet1k` -> `imagenet1k`, `wds_vtab-cifar10`
    -> `vtab/cifar10`."""
    n = (path.stem if path.is_file() else path.name).lower()
    n = n.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # a name that is not UTF-8 prints
    for prefix in ("wds_", "wds-"):
        if n.startswith(prefix):
            n = n[len(prefix):]
    if n.endswith("_test"):
        n = n[: -len("_test")]
    if n.startswith("vtab-"):
        n = "vtab/" + n[len("vtab-"):]
    return n


def _check_task(ds: EvalDataset, task: str) -> None:
    task = canonical_task(task)
    if task == "zeroshot_retrieval" and ds.kind != "retrieval":
        raise FlameError(f"{ds.path} is a classification set (labels, no captions); use zeroshot-classification "
                         "or linear-probe")
    if task in ("zeroshot_classification", "linear_probe") and ds.kind != "classification":
        raise FlameError(f"{ds.path} is a caption set; use --task retrieval")


# ---- (a) webdataset layout ----------------------------------------------------------------------
def _is_wds(path: Path) -> bool:
    return path.is_dir() and any((path / s / "nshards.txt").is_file() for s in ("test", "train"))


def _read_wds(path: Path) -> EvalDataset:
    kind_file = path / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.is_file() else "classification"
    if kind not in ("classification", "retrieval"):
        raise FlameError(f"{kind_file}: dataset type {kind!r} is not supported (classification or retrieval)")
    splits = {}
    for split in ("test", "train"):
        nfile = path / split / "nshards.txt"
        if not nfile.is_file():
            continue
        try:
            n = int(nfile.read_text().strip())
        except ValueError as e:
            raise FlameError(f"{nfile} must hold the number of shards") from e
        shards = [path / split / f"{i}.tar" for i in range(n)]
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise FlameError(f"{path / split} lists {n} shards but {missing[0].name} is missing")
        splits[split] = [it for s in shards for it in _wds_items(s, kind)]
    if "test" not in splits:
        raise FlameError(f"{path} has no test split (test/nshards.txt)")
    classnames = read_lines(path / "classnames.txt") if (path / "classnames.txt").is_file() else None
    tfile = path / "zeroshot_classification_templates.txt"
    templates = read_lines(tfile) if tfile.is_file() else None
    return EvalDataset(path, path.name, "wds", kind, splits, classnames=classnames, templates=templates)


def _wds_items(shard: Path, kind: str) -> list[Item]:
    """Labels / captions of a shard, read from its text members (images are not decoded here)."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard, "r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                key = m.name[: len(m.name) - len(base)] + key
                s = samples.setdefault(key, {})
                ext = ext.lower()
                if ext in ("cls", "txt") or ext in IMAGE_EXTS:
                    problem = member_problem(m, MAX_TEXT_BYTES if ext in ("cls", "txt") else MAX_IMAGE_BYTES)
                    if problem:
                        raise FlameError(f"{shard}: member {m.name!r} {problem}; the shard is refused")
                if ext in ("cls", "txt"):
                    s[ext] = tf.extractfile(m).read(MAX_TEXT_BYTES).decode("utf-8", "replace")
                elif ext in IMAGE_EXTS:
                    s["image"] = True
    except TAR_ERRORS as e:
        reason = first_line(e) or e.__class__.__name__
        raise FlameError(f"cannot read {shard} (truncated or corrupt?): {reason}") from None
    items = []
    for key, s in samples.items():
        if kind == "retrieval":
            caps = [c.strip() for c in s.get("txt", "").splitlines() if c.strip()]
            if not caps:
                continue
            items.append(Item(shard=str(shard), key=key, captions=caps))
        else:
            if "cls" not in s:
                continue
            try:
                label = int(s["cls"].strip())
            except ValueError as e:
                raise FlameError(f"{shard}: sample {key} has a non-integer cls {s['cls']!r}") from e
            items.append(Item(shard=str(shard), key=key, label=label))
    return items


def member_problem(m: tarfile.TarInfo, limit: int) -> str | None:
    """Why tar member `m` is not read into memory (sparse, or declared over `limit` bytes), or None."""
    if m.issparse():
        return "is a GNU sparse member (never read)"
    if m.size > limit:
        return f"declares {m.size:,} bytes, over the limit of {limit:,}"
    return None


# ---- (b) class folders -----------------------------------------------------------------------
def _unread_hint(path: Path) -> str:
    if not path.is_dir():
        return ""
    unread = next((p for p in path.rglob("*") if p.suffix.lower() in UNREAD_IMAGE_EXTS), None)
    return f" ({unread.name}: TIFF and GIF images are not read; convert them to PNG or JPEG)" if unread else ""


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in FILE_IMAGE_EXTS and p.is_file())


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and _image_files(d))


def _is_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    if all((path / s).is_dir() and _class_dirs(path / s) for s in ("train", "test")):
        return True
    return len(_class_dirs(path)) >= 2 and not any((path / t).is_file() for t in TABLE_NAMES)


def _read_folder(path: Path) -> EvalDataset:
    split_dirs = {"train": path / "train", "test": path / "test"}
    if not all(d.is_dir() and _class_dirs(d) for d in split_dirs.values()):
        split_dirs = {"test": path}
    names = sorted({d.name for s in split_dirs.values() for d in _class_dirs(s)})
    index = {n: i for i, n in enumerate(names)}
    splits = {
        split: [Item(file=str(f), label=index[d.name]) for d in _class_dirs(folder) for f in _image_files(d)]
        for split, folder in split_dirs.items()
    }
    cfile = path / "classnames.txt"
    classnames = read_lines(cfile) if cfile.is_file() else [n.replace("_", " ") for n in names]
    if len(classnames) != len(names):
        raise FlameError(f"{cfile} lists {len(classnames)} classes but {path} has {len(names)} class folders")
    tfile = path / "zeroshot_classification_templates.txt"
    templates = read_lines(tfile) if tfile.is_file() else None
    return EvalDataset(path, path.name, "folder", "classification", splits, classnames=classnames,
                       templates=templates)


# ---- (c) CSV / JSONL tables ------------------------------------------------------------------
def _table_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
        return path
    if path.is_dir():
        return next((path / t for t in TABLE_NAMES if (path / t).is_file()), None)
    return None


def _rows(table: Path) -> list[dict]:
    try:
        text = table.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark is not part of the header
    except UnicodeDecodeError as e:
        raise FlameError(f"{table} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if table.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise FlameError(f"{table}:{n} is not valid JSON: {first_line(e)}") from e
        return rows
    return list(csv.DictReader(io.StringIO(text)))


def _column(row: dict, names: tuple[str, ...]) -> str | None:
    lower = {k.lower(): k for k in row}
    return next((lower[n] for n in names if n in lower), None)


def _captions(value) -> list[str]:
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [str(value).strip()] if value is not None and str(value).strip() else []


def _read_table(path: Path) -> EvalDataset:
    table = _table_file(path)
    rows = _rows(table)
    if not rows:
        raise FlameError(f"{table} has no rows")
    img_col, cap_col = _column(rows[0], IMAGE_COLUMNS), _column(rows[0], CAPTION_COLUMNS)
    if img_col is None or cap_col is None:
        raise FlameError(f"{table} needs an image column ({', '.join(IMAGE_COLUMNS)}) and a caption column "
                         f"({', '.join(CAPTION_COLUMNS)}); it has {', '.join(rows[0])}")
    lang_col = _column(rows[0], LANGUAGE_COLUMNS)
    by_image: dict[tuple[str, str | None], Item] = {}
    languages: dict[tuple[str, str | None], str | None] = {}
    for row in rows:
        image = str(row.get(img_col) or "").strip()
        if not image:
            continue
        file = Path(image) if Path(image).is_absolute() else table.parent / image
        lang = str(row.get(lang_col) or "").strip() or None if lang_col else None
        key = (str(file), lang)
        item = by_image.setdefault(key, Item(file=str(file)))
        languages[key] = lang
        item.captions.extend(_captions(row.get(cap_col)))
    kept = [(key, it) for key, it in by_image.items() if it.captions]
    return EvalDataset(path, path.name, "table", "retrieval", {"test": [it for _, it in kept]},
                       languages=[languages[key] for key, _ in kept] if lang_col else None)


def _select_language(ds: EvalDataset, language: str | None) -> None:
    langs = ds.languages
    if not langs or all(lang is None for lang in langs):
        ds.language = language or "en"
        return
    present = sorted({lang for lang in langs if lang})
    if language is None:
        ds.language = present[0] if len(present) == 1 else "all"
        return
    keep = [it for it, lang in zip(ds.splits["test"], langs) if lang == language]
    if not keep:
        raise FlameError(f"{ds.path} has no captions in language {language!r} (it has {', '.join(present)})")
    ds.splits["test"] = keep
    ds.languages = [language] * len(keep)
    ds.language = language


READERS = [
    ("wds", _is_wds, _read_wds),
    ("table", lambda p: _table_file(p) is not None, _read_table),
    ("folder", _is_folder, _read_folder),
]
