"""The paper's benchmarks as distributed (`flame eval --benchmark NAME`, EVAL.md): one module per
benchmark family, each registering its `Benchmark` entries in `BENCHMARKS`.

    from flame.evaluate.benchmark import run_benchmark
    results = run_benchmark("urban-1k", model, "data/Urban1k")   # CLIP_benchmark-shaped dicts
"""

from __future__ import annotations

from pathlib import Path

from flame.errors import FlameError
from flame.evaluate.benchmark.base import Benchmark, Options

BENCHMARKS: dict[str, Benchmark] = {}
# the modules holding the entries, each a `BENCHMARKS` tuple; imported on first use
FAMILIES: tuple[str, ...] = ("longcaption", "shortcaption", "sugarcrepe", "winoground", "imagenet", "multilingual")


def register(*benchmarks: Benchmark) -> None:
    for b in benchmarks:
        if b.name in BENCHMARKS:
            raise ValueError(f"benchmark {b.name!r} registered twice")
        BENCHMARKS[b.name] = b


def _load() -> None:
    import importlib

    if not BENCHMARKS:
        for family in FAMILIES:
            register(*importlib.import_module(f"flame.evaluate.benchmark.{family}").BENCHMARKS)


def names() -> list[str]:
    _load()
    return list(BENCHMARKS)


def get(name: str) -> Benchmark:
    _load()
    if name not in BENCHMARKS:
        raise FlameError(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def read_benchmark(name: str, root: str | Path, opts: Options | None = None):
    """Check ROOT holds the named benchmark, complete, and read its description (no model)."""
    bench = get(name)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FlameError(f"{root} does not exist or is not a folder: expected {bench.name} ({bench.layout})")
    return bench.read(root, opts or Options())


def run_benchmark(name: str, model, root: str | Path, opts: Options | None = None) -> list[dict]:
    opts = opts or Options()
    data = read_benchmark(name, root, opts)
    return [{"benchmark": name, **r} for r in get(name).evaluate(model, data, opts)]


__all__ = ["BENCHMARKS", "Benchmark", "Options", "get", "names", "read_benchmark", "register", "run_benchmark"]
