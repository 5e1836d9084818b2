"""Progress for long work: a tqdm bar on a terminal, and without one (a log file, CI) a status line
every `every` seconds and one when the stage ends, instead of the carriage-return redraws a bar
writes (hundreds of kilobytes in a log). The lines read `[DESC] 1,200/5,000 img (24%), 41.2 img/s,
29s`; a stage that did nothing (refused before any work) writes none, so a refusal stays one line.

    bar = progress(total=n, desc="index photos", unit="photo")
    bar.update(k); bar.set_postfix(loss="0.123"); bar.write("a line beside it"); bar.close()

`enabled=False` gives an object that does nothing (the callers' `--no-progress`).
"""

from __future__ import annotations

import os
import sys
import time

EVERY_S = 30.0  # seconds between progress lines without a terminal (FLAME_PROGRESS_EVERY overrides)


def progress(total: float | None = None, desc: str = "", unit: str = "it", initial: int = 0,
             unit_scale: bool = False, enabled: bool = True, file=None):
    """A tqdm bar when `file` (stderr) is a terminal, else a `LineProgress`."""
    file = file or sys.stderr
    if enabled and file.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True,
                    file=file)
    every = float(os.environ.get("FLAME_PROGRESS_EVERY", EVERY_S))
    return LineProgress(total, desc, unit, initial, file, every, enabled)


def _count(n: float) -> str:
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


def _duration(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class LineProgress:
    """tqdm's calls the callers use (update, set_postfix(_str), write, refresh, close, total,
    disable, start_t), written as whole lines."""

    def __init__(self, total, desc: str, unit: str, initial: int, file, every: float, enabled: bool = True):
        self.total, self.desc, self.unit, self.file, self.every = total, desc, unit, file, every
        self.disable = not enabled
        self.n, self.start_n, self.postfix = initial, initial, ""
        self.start_t = self.last_t = time.perf_counter()
        self.closed = False

    def _line(self, what: str) -> None:
        print(f"[{self.desc or 'progress'}] {what}", file=self.file, flush=True)

    def _status(self) -> str:
        elapsed = max(time.perf_counter() - self.start_t, 1e-9)
        done = f"{_count(self.n)}/{_count(self.total)} {self.unit}" if self.total else f"{_count(self.n)} {self.unit}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.start_n) / elapsed
        post = f", {self.postfix}" if self.postfix else ""
        return f"{done}{pct}, {rate:,.1f} {self.unit}/s, {_duration(elapsed)}{post}"

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.disable and now - self.last_t >= self.every:
            self.last_t = now
            self._line(self._status())

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def refresh(self) -> None:
        pass

    def write(self, line: str, file=None) -> None:
        print(line, file=file or self.file, flush=True)

    def close(self) -> None:
        if not self.closed and not self.disable and self.n > self.start_n:
            self._line(self._status())
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
