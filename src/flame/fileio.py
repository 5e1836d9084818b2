"""Durable atomic writes: a reader (or a resumed job, or the same job after a node crash)
sees the old file or the new one, never half of one.

Every write goes to a temporary name, is flushed to disk (`fsync`) and only then renamed
onto its final name; the folder holding the name is fsynced after the rename so the rename
itself survives a crash. Without the fsyncs a crash on a network or journalling filesystem
can leave a zero-length or half-written file under its final name, which a resumed job
would take for complete. This module is the one place that does it (store shards, keys,
manifests, checkpoints, the GGUF cache).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from flame.faults import durable_step

TMP_SUFFIX = ".tmp"
# errors from fsync on a folder that mean "this filesystem does not do that", not a failure
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EISDIR, errno.EACCES}


def fsync_file(path: str | Path) -> None:
    """Flush one file's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (renames, creations, deletions) to disk; a no-op where the
    platform or filesystem cannot fsync folders."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and folder under `path` (files first, each folder after its entries)."""
    path = Path(path)
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(root)


def replace(src: str | Path, dst: str | Path) -> None:
    """Durably move a finished temporary file or folder onto its final name: fsync its
    contents, rename (atomic on one filesystem), fsync the destination folder. A folder
    `dst` must not exist or be empty (os.replace's rule)."""
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        fsync_tree(src)
    else:
        fsync_file(src)
    durable_step()
    os.replace(src, dst)
    durable_step()
    fsync_dir(dst.parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` (str as UTF-8) to `path` durably and atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    durable_step()
    os.replace(tmp, path)
    durable_step()
    fsync_dir(path.parent)


def remove_durable(path: str | Path) -> None:
    """Delete a file (if present) and make the deletion survive a crash."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` on this host still exists (stale lock and temp-folder owners)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
