"""ImageNet's wnids, class names and zero-shot templates, as the clip-benchmark package (1.6.2)
ships them: what CLIP_benchmark evaluates with is what we evaluate with.

Nothing is copied into this project. Names and templates come from the package's data files
`<lang>_classnames.json["imagenet1k"]` and `<lang>_zeroshot_classification_templates.json
["imagenet1k"]` (through `flame.evaluate.classtexts.shipped`); the 1000 wnids in ImageNet's class
order and the 200 of ImageNet-A and ImageNet-R are literal lists in the package's
`datasets/builder.py`, read here with `ast.literal_eval` (the file is parsed, never imported or
run). A subset's classes are the 1000 filtered to its wnids in wnid order, as the builder does.
"""

from __future__ import annotations

import ast
import functools

from flame.errors import FlameError
from flame.evaluate.classtexts import TEMPLATES, package_dir, shipped

LANGUAGES = ("ar", "cn", "en", "it", "jp")  # CLIP_benchmark's codes: cn and jp, not zh and ja
N_CLASSES = 1000
SUBSET_SIZE = 200
# builder.py's names for the lists: the 1000 wnids, and the 200-class subsets
LISTS = {"imagenet1k": "all_imagenet_wordnet_ids", "imagenet-a": "imagenet_a_wnids", "imagenet-r": "imagenet_r_wnids"}
PACKAGE = "clip-benchmark==1.6.2"


def _folder():
    folder = package_dir()
    if folder is None or not (folder / "builder.py").is_file():
        raise FlameError(f"the ImageNet benchmarks take their class names, templates and wnids from the clip-benchmark "
                         f"package, which is not installed: pip install {PACKAGE} --no-deps")
    return folder


@functools.cache
def _builder_lists() -> dict[str, list[str]]:
    path = _folder() / "builder.py"
    found: dict[str, list[str]] = {}
    wanted = set(LISTS.values())
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in wanted and name not in found:
                value = ast.literal_eval(node.value)
                found[name] = sorted(value) if isinstance(value, set) else list(value)
    sizes = {LISTS["imagenet1k"]: N_CLASSES, LISTS["imagenet-a"]: SUBSET_SIZE, LISTS["imagenet-r"]: SUBSET_SIZE}
    if any(len(found.get(k, ())) != n for k, n in sizes.items()):
        raise FlameError(f"{path} does not hold the wnid lists this reader expects ({', '.join(sizes)}); "
                         f"install {PACKAGE}")
    return found


def wnids(subset: str = "imagenet1k") -> list[str]:
    """The wnids of `subset` (imagenet1k, imagenet-a, imagenet-r) in ImageNet's class order."""
    lists = _builder_lists()
    every = lists[LISTS["imagenet1k"]]
    if subset == "imagenet1k":
        return list(every)
    keep = set(lists[LISTS[subset]])
    return [w for w in every if w in keep]


def check_language(language: str, benchmark: str) -> None:
    if language not in LANGUAGES:
        hint = {"zh": "cn", "ja": "jp"}.get(language)
        raise FlameError(f"{benchmark}: no class names in language {language!r}; the languages are "
                         f"{', '.join(LANGUAGES)}" + (f" (CLIP_benchmark's code for it is {hint!r})" if hint else ""))


def names(language: str = "en", subset: str = "imagenet1k") -> list[str]:
    """The class names of `subset` in `language`, in the order of `wnids(subset)`."""
    check_language(language, subset)
    _folder()
    value, _ = shipped("classnames", language, "imagenet1k")
    if not isinstance(value, list) or len(value) != N_CLASSES:
        raise FlameError(f"the clip-benchmark package has no {N_CLASSES} {language!r} ImageNet class names; "
                         f"install {PACKAGE}")
    if subset == "imagenet1k":
        return list(value)
    keep = set(wnids(subset))
    return [n for n, w in zip(value, wnids()) if w in keep]


def templates(language: str = "en") -> list[str]:
    """The zero-shot templates CLIP_benchmark uses for ImageNet (and every variant) in `language`."""
    check_language(language, "imagenet1k")
    _folder()
    value, _ = shipped(TEMPLATES, language, "imagenet1k")
    if not isinstance(value, list) or not value:
        raise FlameError(f"the clip-benchmark package has no {language!r} ImageNet templates; install {PACKAGE}")
    return list(value)
