"""What every benchmark reader shares: its registry entry, the options, and the checks that run
before a model is loaded (the layout, every image present, text files that are UTF-8).

A benchmark is read in two steps so that every problem with the data is found before the model
(and maybe an LLM) is loaded: `Benchmark.read(root, opts)` looks only at files (no image is
decoded) and returns whatever its `evaluate` needs; `Benchmark.evaluate(model, data, opts)`
returns CLIP_benchmark-shaped result dicts (`flame.evaluate.tasks` module docstring), each with
`benchmark`, `prompts`, `images`, `texts` and, where they can occur, `truncated` and `ties`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flame.errors import FlameError
from flame.evaluate.task_names import MAX_UNREADABLE

SHOW_MISSING = 3  # missing images named in the refusal
# the caption caps of the two harnesses' first tokenisation, BOS included (EVAL.md section 0)
RELEASE_CAP = 1024  # the release's long-caption scripts (model.text.max_length)
CLIP_BENCHMARK_CAP = 512  # CLIP_benchmark (LLMTokenizer's default context_length)


@dataclass(frozen=True)
class Options:
    """How a benchmark runs; the protocol itself (captions, prompt set, caps) is the benchmark's."""

    allow_missing: bool = False  # evaluate what is there (recorded as `missing_images`) instead of refusing
    languages: tuple[str, ...] | None = None  # XM3600 / multilingual ImageNet: a subset of the languages
    batch_size: int = 64
    workers: int = 2
    cache_dir: str | Path | None | bool = None
    progress: bool = True
    max_unreadable: float = MAX_UNREADABLE

    def image_options(self) -> dict:
        """The keyword arguments `flame.evaluate.tasks.evaluate` takes for images."""
        return dict(batch_size=self.batch_size, workers=self.workers, cache_dir=self.cache_dir,
                    progress=self.progress, max_unreadable=self.max_unreadable)


@dataclass(frozen=True)
class Benchmark:
    """One of the paper's benchmarks as distributed (EVAL.md): `folder` is its distributed folder
    name (what `--suite paper` looks for under `--data-root`), `layout` what ROOT must hold (said
    when it does not), `protocol` one line for `--help` and the README."""

    name: str
    folder: str
    layout: str
    protocol: str
    read: Callable[[Path, Options], object]
    evaluate: Callable[[object, object, Options], list[dict]]


def not_this(root: Path, name: str, layout: str) -> FlameError:
    """The one line for a ROOT that is not the named benchmark."""
    return FlameError(f"{root} is not {name}: expected {layout}")


def first_dir(root: Path, *candidates: str) -> Path | None:
    """The first of `candidates` (relative paths; "" is ROOT itself) that is a folder under ROOT,
    so that ROOT may be the benchmark's folder or the folder holding it."""
    for c in candidates:
        p = root / c if c else root
        if p.is_dir():
            return p
    return None


def read_text(path: Path) -> str:
    """A text file as UTF-8, or one line saying it is not."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FlameError(f"{path} is not UTF-8 text (byte {e.start}): benchmark files are read as UTF-8") from None
    except OSError as e:
        raise FlameError(f"cannot read {path}: {e.strerror or e}") from None


def read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise FlameError(f"{path} is not valid JSON: {e}") from None


def read_jsonl(path: Path) -> list:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FlameError(f"{path} line {n} is not valid JSON: {e}") from None
    return rows


def present(images: Sequence, name: str, opts: Options, exists: Callable[[object], bool] | None = None
            ) -> tuple[list[int], dict]:
    """The indices of `images` that exist as regular files (or pass `exists`: a tar member, say),
    and what to record about the rest.

    A smaller candidate pool changes every recall, so a missing image is refused in one line that
    counts them and names the first few; with `opts.allow_missing` the rest is evaluated and the
    record (`missing_images`, `missing`) goes into each result."""
    exists = exists or (lambda p: Path(p).is_file())
    keep, missing = [], []
    for i, p in enumerate(images):
        (keep if exists(p) else missing).append(i)
    if not missing:
        return keep, {}
    shown = ", ".join(str(images[i]) for i in missing[:SHOW_MISSING])
    more = f" and {len(missing) - SHOW_MISSING} more" if len(missing) > SHOW_MISSING else ""
    if not opts.allow_missing:
        raise FlameError(f"{name}: {len(missing)} of {len(images)} images are missing ({shown}{more}); "
                         "an incomplete set changes the metrics: add them, or pass --allow-missing to evaluate "
                         "the rest (recorded in the results)")
    return keep, {"missing_images": len(missing), "missing": [str(images[i]) for i in missing[:SHOW_MISSING]]}
