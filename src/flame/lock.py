"""One exclusive lock per job folder: the only file lock in the project.

`FileLock(PATH)` takes an flock on PATH (created if needed). The kernel drops an flock when
its process dies, even by SIGKILL, so it never goes stale. Forked children (DataLoader
workers) close their copy of the descriptor, so an orphaned worker of a killed job cannot
keep the folder locked.

Where the filesystem has no flock (some network mounts answer ENOLCK or EOPNOTSUPP), the
lock falls back to an owner file, `PATH-owner`, created with O_EXCL and holding
`HOST PID`. An owner file left by a dead process on this host is taken over; one held by a
live process (or by another host, which cannot be checked) refuses the job, naming the file
to delete. The fallback is reported once through `notify`. The behaviour is the same for
every user: `flame train` (RUN/.lock), `flame embed` (STORE/.lock), `flame search index`
(INDEX/.lock) and the LLM's GGUF conversion (TARGET.lock, which waits instead of refusing).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from flame.errors import FlameError
from flame.fileio import pid_alive

log = logging.getLogger("flame.lock")

NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
OWNER_SUFFIX = "-owner"


_OPEN: weakref.WeakSet[FileLock] = weakref.WeakSet()  # locks whose descriptor a forked child must close


def _close_in_children() -> None:
    for lock in list(_OPEN):
        lock._close_in_child()


os.register_at_fork(after_in_child=_close_in_children)  # once per process, not once per lock


def holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class FileLock:
    """Exclusive lock on `path` for the life of the object (or of a `with` block).

    busy: the start of the one-line error when another job holds it ("store X is being
    written by another flame embed"); the holder and a hint are appended.
    wait: block until the holder is done instead of refusing (polling, in the fallback).
    notify: how the no-flock fallback is reported (default: a warning in the log)."""

    def __init__(self, path: str | Path, *, busy: str, hint: str = "", wait: bool = False,
                 notify: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.owner: Path | None = None
        self._busy, self._hint, self._wait = busy, hint, wait
        self._notify = notify or log.warning
        try:
            self.file = open(self.path, "a+")  # noqa: SIM115 (held for the job)
        except OSError as e:
            raise FlameError(f"cannot create the lock file {self.path} ({e.strerror or e})") from None
        self.fd: int | None = self.file.fileno()
        _OPEN.add(self)
        try:
            self._flock()
        except BaseException:
            self._close()
            raise

    # -- taking it ------------------------------------------------------------------------
    def _flock(self) -> None:
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self._wait:
                self.file.seek(0)
                holder = self.file.read().strip() or "holder unknown"
                raise self._refused(holder) from None
            log.info("waiting for the job holding %s", self.path)
            fcntl.flock(self.file, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise
            self._owner_file(e)
            return
        self.file.seek(0)
        self.file.truncate()
        self.file.write(holder_text() + "\n")
        self.file.flush()

    def _owner_file(self, why: OSError) -> None:
        owner = self.path.with_name(self.path.name + OWNER_SUFFIX)
        me = f"{socket.gethostname()} {os.getpid()}"
        while True:
            try:
                fd = os.open(owner, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                host, _, pid = owner.read_text(errors="replace").strip().partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                    owner.unlink(missing_ok=True)  # left by a dead job on this host
                    continue
                if self._wait:
                    time.sleep(1.0)
                    continue
                raise self._refused(f"{host} pid {pid}, lock file {owner}; this filesystem has no flock; "
                                    "if no such job runs, delete that file") from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.owner = owner
            self._notify(f"{self.path.parent} has no flock ({os.strerror(why.errno or 0)}); "
                         f"locked with {owner} instead")
            return

    def _refused(self, holder: str) -> FlameError:
        return FlameError(f"{self._busy} ({holder})" + (f"; {self._hint}" if self._hint else ""))

    # -- letting go -----------------------------------------------------------------------
    def _close_in_child(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def _close(self) -> None:
        _OPEN.discard(self)
        self.fd = None
        self.file.close()

    def release(self) -> None:
        if self.owner is not None:
            self.owner.unlink(missing_ok=True)
            self.owner = None
        if not self.file.closed:
            self._close()

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
