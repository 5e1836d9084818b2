"""Resolve a user's shard spec into a sorted list of tar files.

Accepted forms: a brace pattern (`data/cc3m-{0000..0575}.tar`), a glob (`data/*.tar`),
a folder (every `*.tar` in it), one file, or a list of any of these.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

import braceexpand

from flame.errors import FlameError


def expand_shards(spec: str | Path | Iterable[str | Path]) -> list[Path]:
    specs = [spec] if isinstance(spec, str | Path) else list(spec)
    found: list[Path] = []
    missing: list[str] = []
    for item in specs:
        item = str(item)
        if Path(item).is_dir():
            found.extend(sorted(Path(item).glob("*.tar")))
            continue
        for pattern in braceexpand.braceexpand(item):
            if glob.has_magic(pattern):
                found.extend(Path(m) for m in sorted(glob.glob(pattern)) if Path(m).is_file())
            elif Path(pattern).is_file():
                found.append(Path(pattern))
            else:
                missing.append(pattern)
    if not found:
        raise FlameError(f"no shard files match {', '.join(map(str, specs))}")
    if missing:  # a named file (or one of a brace range) is absent: never train/embed on a silent subset
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FlameError(f"shard not found: {missing[0]}{more}")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def shard_name(path: Path) -> str:
    """The store's name for a shard: its file name without `.tar`."""
    return path.name[: -len(".tar")] if path.name.endswith(".tar") else path.name
