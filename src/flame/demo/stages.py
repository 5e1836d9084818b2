"""Stage bookkeeping of `flame demo`: one line per stage (what runs, how long it took, an
estimate of what is left) and the markers that let a second run skip a finished stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flame.fileio import write_atomic


def clock(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}:{s % 60:02d}"


class Stages:
    """Progress lines and stage markers. Each stage's estimate is refined as measurements come
    in; a marker `OUT/stages/NAME.json` holds the key (settings) the stage finished with."""

    def __init__(self, folder: Path, estimates: dict[str, float]):
        self.folder = folder
        self.estimates = dict(estimates)
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self.skipped: list[str] = []
        self.current: str | None = None
        self.start = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return sum(v for k, v in self.estimates.items() if k not in self.times and k != self.current)

    def begin(self, name: str, what: str) -> None:
        self.current, self.start = name, time.perf_counter()
        n = list(self.estimates).index(name) + 1
        guess = self.estimates.get(name, 0)
        print(f"[{n}/{len(self.estimates)}] {name}: {what} (about {clock(guess)}; "
              f"elapsed {clock(self.elapsed())}, about {clock(guess + self.left())} left)", flush=True)

    def end(self, note: str = "", skipped: bool = False) -> None:
        name = self.current
        took = time.perf_counter() - self.start
        self.times[name] = took
        if skipped:
            self.skipped.append(name)
        self.current = None
        print(f"      {name}: {'cached, skipped' if skipped else 'done'} in {clock(took)}{'; ' + note if note else ''}"
              f" (elapsed {clock(self.elapsed())}, about {clock(self.left())} left)", flush=True)

    def marker(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def done_with(self, name: str, key: dict) -> bool:
        try:
            return json.loads(self.marker(name).read_text()) == json.loads(json.dumps(key))
        except (OSError, ValueError):
            return False

    def mark(self, name: str, key: dict) -> None:
        self.marker(name).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.marker(name), json.dumps(key, indent=2) + "\n")

    def timings(self) -> dict[str, float]:
        """Seconds per stage so far, and the total."""
        out = {k: round(v, 1) for k, v in self.times.items()}
        out["total"] = round(self.elapsed(), 1)
        return out
