"""Class names and zero-shot templates of a classification set, in any language.

English comes from the dataset (`classnames.txt`, `zeroshot_classification_templates.txt`).
Another language comes from `classnames_{lang}.txt` / `zeroshot_classification_templates_{lang}.txt`
beside the dataset if present, else from the clip-benchmark package's `{lang}_classnames.json` /
`{lang}_zeroshot_classification_templates.json` under the dataset's CLIP_benchmark name.
`--templates FILE|NAME` replaces the templates in every language. Pure functions of paths and
names: they neither know `EvalDataset` nor decode anything.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from flame.errors import FlameError

TEMPLATES = "zeroshot_classification_templates"


@dataclass
class ClassTexts:
    classnames: list[str] | None
    templates: list[str] | None
    error: str | None = None  # why zero-shot classification cannot run (raised only when it is asked for)


def read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def package_dir() -> Path | None:
    """The installed clip-benchmark package's `datasets/` folder (its shipped data files), or None."""
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "datasets"


def shipped_languages() -> list[str]:
    folder = package_dir()
    if folder is None:
        return []
    return sorted(p.name[: -len("_classnames.json")] for p in folder.glob("*_classnames.json"))


def shipped(kind: str, language: str, name: str) -> tuple[object | None, list[str]]:
    """(value for dataset `name` or None, the dataset names the file has) from `{lang}_{kind}.json`."""
    folder = package_dir()
    f = folder / f"{language}_{kind}.json" if folder else None
    if f is None or not f.is_file():
        return None, []
    table = json.loads(f.read_text(encoding="utf-8"))
    for key in (name, name.split("/")[-1], name.replace("/", "-")):
        if key in table:
            return table[key], sorted(table)
    return None, sorted(table)


def template_set(spec: str, language: str) -> list[str]:
    """`--templates`: a file of templates, or the name of a set shipped with clip-benchmark."""
    p = Path(spec).expanduser()
    if p.is_file():
        return read_lines(p)
    value, names = shipped(TEMPLATES, language, spec)
    if value is None:
        raise FlameError(f"--templates {spec}: not a file, nor a template set shipped for language {language!r} "
                         f"(shipped: {', '.join(names) or 'none'})")
    return list(value)


def _names_in(language: str, root: Path, name: str, n_classes: int | None) -> list[str]:
    """The class names in a language other than English (the dataset's own file first)."""
    own = root / f"classnames_{language}.txt"
    if own.is_file():
        names = read_lines(own)
    else:
        languages = shipped_languages()
        if language not in languages:
            raise FlameError(
                f"no class names in language {language!r}: the clip-benchmark package ships class names in "
                f"{', '.join(languages) or 'no language'}; or add {own.name} to {root}"
            )
        found, known = shipped("classnames", language, name)
        if found is None:
            raise FlameError(
                f"the clip-benchmark package has no {language!r} class names for dataset {name!r} (it has them for "
                f"{', '.join(known)}); name the dataset with --dataset-name or add {own.name} to {root}"
            )
        names = list(found)
    if n_classes is not None and len(names) != n_classes:
        raise FlameError(f"{len(names)} {language!r} class names for {name!r}, but the dataset has "
                         f"{n_classes} classes")
    return names


def _templates(language: str, root: Path, name: str, own: list[str] | None,
               spec: str | None) -> tuple[list[str] | None, str]:
    """-> (the templates, where a user would add them)."""
    if language == "en":
        where = f"{TEMPLATES}.txt in {root} or a shipped template set"
        if spec:
            return template_set(spec, language), where
        return (own if own is not None else shipped(TEMPLATES, "en", name)[0]), where
    own_file = root / f"{TEMPLATES}_{language}.txt"
    where = f"{own_file.name} in {root} or a shipped {language!r} template set"
    if spec:
        return template_set(spec, language), where
    if own_file.is_file():
        return read_lines(own_file), where
    return shipped(TEMPLATES, language, name)[0], where


def class_texts(path: Path, name: str, language: str, classnames: list[str] | None,
                templates: list[str] | None, spec: str | None) -> ClassTexts:
    """The class names and templates a classification set at `path` (CLIP_benchmark name `name`)
    uses in `language`, from what the dataset itself brings (`classnames`, `templates`, English)."""
    root = path if path.is_dir() else path.parent
    if language != "en":
        classnames = _names_in(language, root, name, len(classnames) if classnames else None)
    templates, where = _templates(language, root, name, templates, spec)
    if classnames is None:
        return ClassTexts(classnames, templates, f"{path} has labels but no class names (classnames.txt)")
    if not templates:
        return ClassTexts(classnames, templates, (
            f"{name!r} has class names but no zero-shot templates: add {where}, or pass --templates FILE|NAME "
            "(e.g. --templates imagenet1k)"
        ))
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise FlameError(f"template {bad[0]!r} has no {{c}} placeholder for the class name")
    return ClassTexts(classnames, templates)
