"""What the zero-shot classification benchmarks share (ImageNet and its variants, EVAL.md 2.2 and 5):
the description a reader returns (`ClassSet`), the checks for an incomplete set, the CLIP_benchmark
webdataset layout, and the evaluation.

The protocol is the generic one of `flame.evaluate.tasks.evaluate`: the raw prompt set, one vector
per (class, template), per class the mean of the normalised template vectors renormalised, logits
100 * cos, `acc1`, `acc5`, `mean_per_class_recall`. Each language is one result; the images are
encoded once (the image cache is keyed by the set, not the language).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flame.errors import FlameError
from flame.evaluate.benchmark.base import SHOW_MISSING, Options, not_this
from flame.evaluate.classtexts import ClassTexts, class_texts
from flame.evaluate.datasets import EvalDataset, Item, load_dataset


@dataclass
class ClassSet:
    """A classification benchmark read from disk (no image decoded): `name` is CLIP_benchmark's
    dataset name (the results' `dataset`), `texts` the class names and templates per language."""

    name: str
    path: Path
    items: list[Item]
    texts: dict[str, tuple[list[str], list[str]]]
    format: str = "folder"  # "wds" for the CLIP_benchmark webdataset layout (images read from its tars)
    record: dict = field(default_factory=dict)  # merged into every result (what is missing, the layout)


def languages(opts: Options, benchmark: str, allowed: tuple[str, ...], default: tuple[str, ...] = ("en",)):
    """The languages to evaluate (`--language a,b`), each one CLIP_benchmark ships names for."""
    from flame.evaluate.benchmark.imagenet_classes import check_language

    chosen = tuple(dict.fromkeys(opts.languages)) if opts.languages else default
    for lang in chosen:
        if lang not in allowed:
            check_language(lang, benchmark)  # an unknown code is named with the five
            raise FlameError(f"{benchmark} is evaluated in {', '.join(allowed)} only (CLIP_benchmark ships class "
                             f"names in other languages for imagenet1k alone); not --language {lang}")
    return chosen


def incomplete(name: str, what: str, missing: list[str], total: int, opts: Options) -> dict:
    """Missing classes (a folder per class) as `base.present` treats missing images: refused in one
    line that counts and names them, or with `opts.allow_missing` recorded in each result."""
    if not missing:
        return {}
    shown = ", ".join(missing[:SHOW_MISSING])
    more = f" and {len(missing) - SHOW_MISSING} more" if len(missing) > SHOW_MISSING else ""
    if not opts.allow_missing:
        raise FlameError(f"{name}: {len(missing)} of {total} {what} are missing ({shown}{more}); an incomplete set "
                         "changes the metrics: add them, or pass --allow-missing to evaluate the rest (recorded in "
                         "the results; the classification stays over every class)")
    key = what.replace(" ", "_")
    return {f"missing_{key}": len(missing), f"missing_{key}_first": missing[:SHOW_MISSING]}


def short(name: str, found: int, total: int | None, opts: Options) -> dict:
    """Fewer images than the set is distributed with: refused in one line, or recorded."""
    if total is None or found >= total:
        return {}
    if not opts.allow_missing:
        raise FlameError(f"{name}: {found:,} images where the set as distributed has {total:,} ({total - found:,} "
                         "missing); an incomplete set changes the metrics: complete it, or pass --allow-missing "
                         "to evaluate the rest (recorded in the results)")
    return {"expected_images": total}


def wds_layout(root: Path, name: str, n_classes: int, langs: tuple[str, ...]) -> ClassSet | None:
    """ROOT (or ROOT/wds_NAME) in CLIP_benchmark's webdataset layout (HF clip-benchmark/wds_NAME),
    read by the generic reader, or None when it is not that layout. As CLIP_benchmark does, the
    set's own classnames.txt and templates are used in English; another language takes the
    package's names and templates for `name` (flame.evaluate.classtexts)."""
    folder = next((d for d in (root, root / f"wds_{name}") if (d / "test" / "nshards.txt").is_file()), None)
    if folder is None:
        return None
    ds = load_dataset(folder, "zeroshot_classification", "en", name)  # labels read once, English names
    if ds.kind != "classification":
        raise not_this(root, name, f"a classification set (its dataset_type.txt says {ds.kind})")
    if ds.classnames is None or len(ds.classnames) != n_classes:
        got = len(ds.classnames) if ds.classnames else "no"
        raise not_this(root, name, f"{n_classes} class names in its classnames.txt, not {got}")
    texts = {}
    for lang in langs:
        found = (ClassTexts(ds.classnames, ds.templates, ds.template_error) if lang == "en"
                 else class_texts(ds.path, name, lang, ds.classnames, ds.templates, None))
        if found.error:
            raise FlameError(found.error)
        texts[lang] = (found.classnames, found.templates)
    items = ds.items("test")
    return ClassSet(f"wds/{name}", folder, items, texts, format="wds", record={"layout": "wds"})


def evaluate_classes(model, data: ClassSet, opts: Options) -> list[dict]:
    """One CLIP_benchmark-shaped result per language."""
    from flame.evaluate.tasks import evaluate

    results = []
    for lang, (classnames, templates) in data.texts.items():
        ds = EvalDataset(data.path, data.name, data.format, "classification", {"test": data.items}, language=lang,
                         classnames=classnames, templates=templates)
        result = evaluate(model, ds, "zeroshot_classification", "raw", **opts.image_options())
        result.update(texts=len(classnames) * len(templates), **data.record)
        results.append(result)
    return results
