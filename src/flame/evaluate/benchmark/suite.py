"""`flame eval --suite paper --data-root DIR`: which of the registered benchmarks DIR holds, each
looked for in its distributed folder name (`Benchmark.folder`)."""

from __future__ import annotations

from pathlib import Path

from flame.errors import FlameError
from flame.evaluate.benchmark import get, names


def find(data_root: str | Path) -> tuple[list[tuple[str, Path]], list[dict]]:
    """The (name, folder) of every registered benchmark whose folder is under DATA_ROOT, and the
    others ({benchmark, folder}), in registry order."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FlameError(f"--data-root {root} does not exist or is not a folder")
    found, skipped = [], []
    for name in names():
        folder = get(name).folder
        if (root / folder).is_dir():
            found.append((name, root / folder))
        else:
            skipped.append({"benchmark": name, "folder": folder})
    if not found:
        expected = ", ".join(sorted({get(n).folder for n in names()}))
        raise FlameError(f"{root} holds none of the paper's benchmarks: expected one or more of the folders {expected}")
    return found, skipped
