"""Hostile inputs shared by the fault tests."""

from __future__ import annotations

from pathlib import Path


class Evil:
    """A pickle payload: unpickling it runs code that writes `marker` (so a test can prove a
    loader never executed it, and that the payload is live with an unsafe load)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))
