"""Webdataset tar shards: a user's shard spec -> a sorted list of tar files, and the rule
that turns a tar member's name into a sample key and extension (the one scanner of keys).

Accepted specs: a brace pattern (`data/cc3m-{0000..0575}.tar`), a glob (`data/*.tar`),
a folder (every `*.tar` in it), one file, or a list of any of these.
"""

from __future__ import annotations

import glob
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

import braceexpand
from webdataset.tariterators import base_plus_ext

from flame.errors import FlameError, first_line

_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, never samples


class ShardError(FlameError):
    """One shard cannot be read (corrupt, truncated, duplicate members): the shard is
    reported and skipped, the rest of the run goes on."""


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
        raise FlameError(f"shard {missing[0]} does not exist{more}")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def shard_name(path: Path) -> str:
    """The store's name for a shard: its file name without `.tar`."""
    return path.name[: -len(".tar")] if path.name.endswith(".tar") else path.name


def unique_shards(spec: str | Path | Iterable[str | Path]) -> list[Path]:
    """`expand_shards`, refusing two shards of the same file name (a store names its shards by
    the input's file name, so two `0000.tar` in different folders would collide)."""
    shards = expand_shards(spec)
    names = [shard_name(p) for p in shards]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FlameError(f"two input shards share the name {dup!r}; store shards are named by file name")
    return shards


# ---- members: webdataset's rule, in one place -------------------------------------------------
def member_key(name: str) -> tuple[str | None, str | None]:
    """A tar member name -> (sample key, extension): the key is the path up to the first dot of
    the file name (`dir/0001.jpg` -> `dir/0001`, `jpg`; `a.b.txt` -> `a`, `b.txt`), exactly as
    webdataset groups samples; (None, None) for a name without an extension."""
    return base_plus_ext(name)


def is_sample_member(info: tarfile.TarInfo) -> bool:
    """A regular file that is not webdataset metadata (`__*__`): what webdataset reads."""
    return info.isreg() and not _META.match(info.name)


def tar_keys(path: str | Path, limit: int | None = None) -> list[str]:
    """The sample keys of a tar in member order, from its headers only (no payload is read);
    at most `limit` of them. Raises ShardError for a tar that cannot be read."""
    keys: dict[str, None] = {}
    try:
        with tarfile.open(path) as tar:
            for info in tar:
                key = member_key(info.name)[0] if is_sample_member(info) else None
                if key is not None:
                    keys[key] = None
                    if limit and len(keys) >= limit:
                        break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"cannot read shard {path}: {first_line(e)}") from e
    return list(keys)


def readable_tar_keys(paths: Iterable[str | Path]) -> set[str]:
    """The keys of every given tar; an unreadable one contributes none (it is reported when
    its own turn comes)."""
    keys: set[str] = set()
    for path in paths:
        try:
            keys.update(tar_keys(path))
        except ShardError:
            continue
    return keys
