"""ImageNet-1k zero-shot, its multilingual versions and its variants, read as distributed (EVAL.md
2.2 and 5) or in CLIP_benchmark's webdataset layout (`wds_<name>`, `classification.wds_layout`).

Labels never come from sorting what happens to be on disk: ImageNet, ImageNet-A/R and
ImageNet-Sketch label a wnid folder by the wnid's place in ImageNet's class order (the 200-class
subsets by its place among their 200, the order CLIP_benchmark filters the names in), ImageNet-V2
by int(folder name) (a string sort puts 10 before 2), ObjectNet by its mapped folders sorted.
So a missing class folder cannot shift the others' labels; it is refused as missing data
(`--allow-missing` evaluates the rest, still over every class). Fewer images than the set is
distributed with (`TOTALS`) are refused the same way.

ImageNet-1k is torchvision's val layout, the one the release ran (`meta.bin`, read with
weights_only, and `val/<wnid>/`): meta.bin lists every validation image's class, in the order of
the file names, so every missing image is named. The devkit and val tars themselves are refused
with the one command that unpacks them (torchvision's, as CLIP_benchmark runs it).
"""

from __future__ import annotations

from pathlib import Path

from flame.errors import FlameError
from flame.evaluate.benchmark import imagenet_classes as IC
from flame.evaluate.benchmark.base import Benchmark, Options, first_dir, not_this, present, read_json
from flame.evaluate.benchmark.classification import (
    ClassSet,
    evaluate_classes,
    incomplete,
    languages,
    short,
    wds_layout,
)
from flame.evaluate.datasets import FILE_IMAGE_EXTS, Item
from flame.weights import load_torch

# images in each set as distributed (a shortfall is missing data)
TOTALS = {"imagenet1k": 50_000, "imagenetv2": 10_000, "imagenet-a": 7_500, "imagenet-r": 30_000,
          "imagenet-sketch": 50_889}
DEVKIT, VAL_TAR = "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_val.tar"
V2_FOLDERS = ("ImageNetV2-matched-frequency", "imagenetv2-matched-frequency-format-val")
OBJECTNET_MAPS = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json")
OBJECTNET_CLASSES = 113  # the classes of a wds_objectnet
ENGLISH = ("en",)

IN1K_LAYOUT = ("torchvision's ImageNet val layout: meta.bin and val/<wnid>/ILSVRC2012_val_*.JPEG "
               "(or CLIP_benchmark's wds_imagenet1k)")
V2_LAYOUT = "ImageNetV2-matched-frequency/<0..999>/*.jpeg (or the folder itself, or wds_imagenetv2)"
OBJECTNET_LAYOUT = ("objectnet-1.0/images/<folder>/ with folder_to_objectnet_label.json and "
                    "objectnet_to_imagenet_1k.json in ROOT or objectnet-1.0/mappings/ (or wds_objectnet)")


def _layout(folder: str, subset: str, wds: str) -> str:
    n = len(IC.wnids(subset)) if subset != "imagenet1k" else IC.N_CLASSES
    return f"{folder}/<wnid>/: the {n} wnid folders (or the folder itself, or {wds})"


def _files(folder: Path) -> list[Path]:
    """The images of one class folder (the formats that are decoded), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FILE_IMAGE_EXTS and p.is_file())


def _dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _english(subset: str) -> dict:
    return {"en": (IC.names("en", subset), IC.templates("en"))}


# ---- ImageNet-1k (torchvision) ------------------------------------------------------------------
def _meta(path: Path) -> tuple[dict, list[str]]:
    meta = load_torch(path, "ImageNet meta file")
    if not (isinstance(meta, (tuple, list)) and len(meta) == 2 and isinstance(meta[0], dict)
            and isinstance(meta[1], list) and all(isinstance(w, str) for w in meta[1])):
        raise FlameError(f"{path} is not torchvision's ImageNet meta file (a (wnid_to_classes, val_wnids) pair)")
    return meta[0], meta[1]


def _not_unpacked(root: Path) -> FlameError:
    needs = DEVKIT if (root / "val").is_dir() else f"{DEVKIT} and {VAL_TAR}"
    return FlameError(f"{root} holds ImageNet but not torchvision's unpacked layout (meta.bin and val/<wnid>/): "
                      f"with {needs} in it, unpack it once with: python -c \"from torchvision.datasets import "
                      f"ImageNet; ImageNet('{root}', split='val')\" (as CLIP_benchmark does; it writes meta.bin and "
                      "val/, 6.4 GB)")


def read_imagenet1k(root: Path, opts: Options, default: tuple[str, ...] = ENGLISH,
                    name: str = "imagenet1k") -> ClassSet:
    langs = languages(opts, name, IC.LANGUAGES, default)
    texts = {lang: (IC.names(lang), IC.templates(lang)) for lang in langs}  # the package is there, first
    wds = wds_layout(root, "imagenet1k", IC.N_CLASSES, langs)
    if wds is not None:
        return wds
    if not ((root / "meta.bin").is_file() and (root / "val").is_dir()):
        if (root / "val").is_dir() or any((root / n).is_file() for n in (DEVKIT, VAL_TAR)):
            raise _not_unpacked(root)
        raise not_this(root, name, IN1K_LAYOUT)
    wnid_to_classes, val_wnids = _meta(root / "meta.bin")
    order = IC.wnids()
    index = {w: i for i, w in enumerate(order)}
    if set(wnid_to_classes) != set(order):
        raise not_this(root, name, f"{IN1K_LAYOUT}; its meta.bin does not name the 1000 ImageNet-1k wnids")
    odd = next((w for w in val_wnids if w not in index), None)
    if odd is not None:
        raise FlameError(f"{root / 'meta.bin'} gives a validation image the class {odd!r}, not an ImageNet-1k wnid")
    # torchvision moves the sorted val images (ILSVRC2012_val_00000001.JPEG, ...) into val/<their wnid>/
    files = [root / "val" / w / f"ILSVRC2012_val_{i:08d}.JPEG" for i, w in enumerate(val_wnids, 1)]
    keep, record = present(files, name, opts)
    record.update(short(name, len(files), TOTALS["imagenet1k"], opts))
    items = [Item(file=str(files[i]), label=index[val_wnids[i]]) for i in keep]
    return ClassSet("imagenet1k", root, items, texts, record=record)


# ---- ImageNet-V2 ----------------------------------------------------------------------------------
def read_imagenetv2(root: Path, opts: Options) -> ClassSet:
    langs = languages(opts, "imagenetv2", ENGLISH)
    texts = _english("imagenet1k")
    wds = wds_layout(root, "imagenetv2", IC.N_CLASSES, langs)
    if wds is not None:
        return wds
    folder = first_dir(root, *V2_FOLDERS) or root
    dirs = _dirs(folder)
    labels = {n: int(n) for n in dirs if n.isdigit() and str(int(n)) == n and int(n) < IC.N_CLASSES}
    if not labels:
        raise not_this(root, "imagenetv2", V2_LAYOUT)
    odd = next((n for n in dirs if n not in labels), None)
    if odd is not None:
        raise FlameError(f"{folder / odd} is not an ImageNetV2 class folder (its folders are the labels 0..999)")
    files = {n: _files(folder / n) for n in labels}
    missing = [str(i) for i in range(IC.N_CLASSES) if not files.get(str(i))]
    record = incomplete("imagenetv2", "class folders", missing, IC.N_CLASSES, opts)
    # label = int(folder name), never the folder's place in a string sort
    items = [Item(file=str(f), label=labels[n]) for n in sorted(files, key=int) for f in files[n]]
    record.update(short("imagenetv2", len(items), TOTALS["imagenetv2"], opts))
    return ClassSet("imagenetv2", folder, items, texts, record=record)


# ---- wnid folders: ImageNet-A, ImageNet-R, ImageNet-Sketch ----------------------------------------
def read_wnid_folders(root: Path, opts: Options, name: str, subset: str, candidates: tuple[str, ...],
                      cb_name: str) -> ClassSet:
    """A folder of wnid folders; label = the wnid's place in `subset` (ImageNet's order)."""
    languages(opts, name, ENGLISH)
    order = IC.wnids(subset)
    texts = {"en": (IC.names("en", subset), IC.templates("en"))}
    wds = wds_layout(root, cb_name, len(order), ENGLISH)
    if wds is not None:
        return wds
    index = {w: i for i, w in enumerate(order)}
    layout = _layout(candidates[0], subset, f"wds_{cb_name}")
    folder = next((d for d in (*(root / c for c in candidates), root)
                   if d.is_dir() and any(n in index for n in _dirs(d))), None)
    if folder is None:
        raise not_this(root, name, layout)
    odd = next((n for n in _dirs(folder) if n not in index), None)
    if odd is not None:
        raise not_this(root, name, f"{layout}; {folder / odd} is not one of its {len(order)} classes")
    files = {w: _files(folder / w) for w in order if (folder / w).is_dir()}
    record = incomplete(name, "classes", [w for w in order if not files.get(w)], len(order), opts)
    items = [Item(file=str(f), label=index[w]) for w in order for f in files.get(w, ())]
    record.update(short(name, len(items), TOTALS[name], opts))
    return ClassSet(cb_name, folder, items, texts, record=record)


# ---- ObjectNet ------------------------------------------------------------------------------------
def _objectnet_maps(root: Path, base: Path) -> tuple[dict, dict]:
    maps = []
    for f in OBJECTNET_MAPS:
        path = next((p for p in (root / f, base / "mappings" / f) if p.is_file()), None)
        if path is None:
            raise not_this(root, "objectnet", f"{OBJECTNET_LAYOUT}; {f} is in neither")
        value = read_json(path)
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise FlameError(f"{path} is not ObjectNet's mapping (a JSON object of names)")
        maps.append(value)
    return maps[0], maps[1]


def read_objectnet(root: Path, opts: Options) -> ClassSet:
    """The 113 ObjectNet classes that map to ImageNet: names = their ObjectNet names lowercased,
    labels = their folders sorted; folders outside them are left out (CLIP_benchmark's reading)."""
    langs = languages(opts, "objectnet", ENGLISH)
    wds = wds_layout(root, "objectnet", OBJECTNET_CLASSES, langs)
    if wds is not None:
        return wds
    base = next((d for d in (root / "objectnet-1.0", root) if (d / "images").is_dir()), None)
    if base is None:
        raise not_this(root, "objectnet", OBJECTNET_LAYOUT)
    folder_label, to_imagenet = _objectnet_maps(root, base)
    label_folder = {v: k for k, v in folder_label.items()}
    unknown = next((lab for lab in to_imagenet if lab not in label_folder), None)
    if unknown is not None:
        raise FlameError(f"ObjectNet class {unknown!r} of objectnet_to_imagenet_1k.json has no folder in "
                         "folder_to_objectnet_label.json")
    folders = sorted(label_folder[lab] for lab in to_imagenet)
    files = {f: _files(base / "images" / f) for f in folders if (base / "images" / f).is_dir()}
    record = incomplete("objectnet", "classes", [f for f in folders if not files.get(f)], len(folders), opts)
    items = [Item(file=str(p), label=i) for i, f in enumerate(folders) for p in files.get(f, ())]
    texts = {"en": ([folder_label[f].lower() for f in folders], IC.templates("en"))}
    return ClassSet("objectnet", base, items, texts, record=record)


PROTOCOL = "zero-shot classification, raw set, per-class mean of the normalised template vectors, 100*cos"
BENCHMARKS = (
    Benchmark("imagenet1k", "imagenet1k", IN1K_LAYOUT,
              f"1000-way {PROTOCOL}, CLIP_benchmark's names and templates; --language ar,cn,en,it,jp",
              read_imagenet1k, evaluate_classes),
    Benchmark("imagenet1k-multilingual", "imagenet1k", IN1K_LAYOUT,
              f"imagenet1k in ar, cn, en, it, jp (one result each; --language picks), {PROTOCOL}",
              lambda root, opts: read_imagenet1k(root, opts, IC.LANGUAGES, "imagenet1k-multilingual"),
              evaluate_classes),
    Benchmark("imagenetv2", "imagenetv2", V2_LAYOUT, f"1000-way {PROTOCOL}; label = int(folder name)",
              read_imagenetv2, evaluate_classes),
    Benchmark("imagenet-a", "imagenet-a", "imagenet-a/<wnid>/: its 200 wnid folders (or wds_imagenet-a)",
              f"200-way {PROTOCOL}", lambda root, opts: read_wnid_folders(
                  root, opts, "imagenet-a", "imagenet-a", ("imagenet-a",), "imagenet-a"), evaluate_classes),
    Benchmark("imagenet-r", "imagenet-r", "imagenet-r/<wnid>/: its 200 wnid folders (or wds_imagenet-r)",
              f"200-way {PROTOCOL}", lambda root, opts: read_wnid_folders(
                  root, opts, "imagenet-r", "imagenet-r", ("imagenet-r",), "imagenet-r"), evaluate_classes),
    Benchmark("imagenet-sketch", "sketch", "sketch/<wnid>/: the 1000 wnid folders (or wds_imagenet_sketch)",
              f"1000-way {PROTOCOL}", lambda root, opts: read_wnid_folders(
                  root, opts, "imagenet-sketch", "imagenet1k", ("sketch", "imagenet-sketch"), "imagenet_sketch"),
              evaluate_classes),
    Benchmark("objectnet", "objectnet", OBJECTNET_LAYOUT, f"113-way {PROTOCOL}; names = ObjectNet's, lowercased",
              read_objectnet, evaluate_classes),
)
