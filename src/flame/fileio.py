"""Durable atomic writes: a reader (or a resumed job, or the same job after a node crash)
sees the old file or the new one, never half of one.

Every write goes to a temporary name, is flushed to disk (`fsync`) and only then renamed
onto its final name; the folder holding the name is fsynced after the rename so the rename
itself survives a crash. Without the fsyncs a crash on a network or journalling filesystem
can leave a zero-length or half-written file under its final name, which a resumed job
would take for complete. This module is the one place that does it (store shards, keys,
manifests, checkpoints, the GGUF cache).

`write_atomic`'s temporary is unique to the write: `.NAME~RANDOM~HOST~PID.tmp` in the same folder,
created with O_CREAT|O_EXCL (`tempfile.mkstemp`), so two processes writing one name at once (two
`flame eval` jobs filling one image-cache entry) never share or truncate a temporary, the last
rename wins whole, and a symlink planted under any temporary name is never followed (the final
name is replaced by the rename itself, never opened). A writer that dies leaves its temporary;
`stale_temporaries` finds those whose writer is gone (dead process on this host, or older than
STALE_S) for the folder's owner to remove.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from flame.faults import durable_step

TMP_SUFFIX = ".tmp"
STALE_S = 24 * 3600  # a temporary of another host's writer older than this is abandoned
_NAME_KEEP = 60  # characters of the final name kept in a temporary's name (NAME_MAX is 255 bytes)
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp creates 0600, a written file gets 0666 & ~umask like open()
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


def _host() -> str:
    return socket.gethostname().replace("~", "_").replace("/", "_") or "host"


def temporary_parts(name: str) -> tuple[str, str, int] | None:
    """(start of the final name, host, pid) of a `write_atomic` temporary's file name, else None."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    parts = name[1 : -len(TMP_SUFFIX)].rsplit("~", 3)
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    return parts[0], parts[2], int(parts[3])


def is_temporary_of(name: str, final: str) -> bool:
    """Whether file name `name` is a `write_atomic` temporary (or the old fixed `FINAL.tmp`) of `final`."""
    parts = temporary_parts(name)
    return name == final + TMP_SUFFIX or (parts is not None and parts[0] == final[:_NAME_KEEP])


def stale_temporaries(folder: str | Path, final: str | None = None) -> Iterator[Path]:
    """The `write_atomic` temporaries in `folder` (of `final` only, when given) whose writer is
    gone: its process is dead on this host, or the file is older than STALE_S."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    host, now = _host(), time.time()
    for e in entries:
        parts = temporary_parts(e.name)
        if parts is None or (final is not None and parts[0] != final[:_NAME_KEEP]):
            continue
        try:
            old = now - e.stat(follow_symlinks=False).st_mtime > STALE_S
        except OSError:
            continue
        if old or (parts[1] == host and not pid_alive(parts[2])):
            yield Path(e.path)


def remove_stale_temporaries(folder: str | Path, final: str | None = None) -> int:
    """Remove `stale_temporaries(folder, final)`; returns how many went."""
    n = 0
    for p in stale_temporaries(folder, final):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def write_atomic(path: str | Path, data: str | bytes | Callable[[BinaryIO], object]) -> None:
    """Write `data` (str as UTF-8; or a function that writes into the open file, e.g. torch.save,
    so nothing is copied in memory) to `path` durably and atomically, through a temporary unique to
    this write (module docstring); on any error the temporary is removed and `path` is as it was."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:_NAME_KEEP]}~",
                               suffix=f"~{_host()}~{os.getpid()}{TMP_SUFFIX}")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        durable_step()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
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
