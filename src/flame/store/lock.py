"""The lock of a store folder while one job writes it (`flame embed`, its release import)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flame.lock import FileLock


class StoreLock:
    """`flame.lock.FileLock` on STORE/.lock for the whole job (STORE/.lock-owner where the
    filesystem has no flock). A folder this job created and never turned into a store (no
    manifest: it failed before writing one) is removed again on release."""

    def __init__(self, path: Path, notify: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = FileLock(
                self.path / ".lock",
                busy=f"store {self.path} is being written by another flame embed",
                hint="wait for it to finish or choose another --out",
                notify=notify,
            )
        except BaseException:
            self._remove_if_unused()
            raise

    def release(self) -> None:
        self.lock.release()
        self._remove_if_unused()

    def _remove_if_unused(self) -> None:
        if not self.created or (self.path / "manifest.json").exists():
            return
        (self.path / ".lock").unlink(missing_ok=True)
        for sub in (self.path / "shards", self.path):
            try:
                sub.rmdir()
            except OSError:
                pass
