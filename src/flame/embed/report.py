"""What `flame embed` tells the user: counters of a run, merged over ranks, the summary line
and the final verdict (a FlameError, exit 2, when shards failed or nothing was stored)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from flame.embed.config import Config
from flame.errors import FlameError
from flame.store import EmbeddingStore
from flame.units import human_bytes, human_time


@dataclass
class Stats:
    samples: int = 0
    done: int = 0
    failed: list = field(default_factory=list)  # (name, reason)
    truncated: int = 0
    missing: int = 0
    empty: int = 0
    bytes: int = 0
    captions: int = 0
    repeats: int = 0
    tokens: int = 0

    @classmethod
    def total(cls, parts: list[Stats]) -> Stats:
        """The counters of every rank added up (failed shards listed in rank order)."""
        out = cls()
        for part in parts:
            for f in fields(cls):
                setattr(out, f.name, getattr(out, f.name) + getattr(part, f.name))
        return out


def note(message: str) -> None:
    """A one-line remark on stderr that is not an error (e.g. the lock's no-flock fallback)."""
    print(f"flame embed: note: {message}", file=sys.stderr)


def summary(cfg: Config, out: Path, total: Stats, skipped: int, elapsed: float) -> None:
    print(
        f"flame embed: {total.samples:,} samples, shards {total.done} done / {skipped} skipped / "
        f"{len(total.failed)} failed, {total.truncated:,} truncated captions, {total.missing:,} samples "
        f"missing a caption ({cfg.on_missing}), {total.empty:,} empty captions ({cfg.on_empty}), "
        f"{total.repeats:,} repeated captions reused, {human_bytes(total.bytes)} written to {out} "
        f"in {human_time(elapsed)}"
    )


def verdict(cfg: Config, out: Path, total: Stats) -> int:
    """0, or the FlameError that makes the run exit 2 after its summary."""
    if total.failed:
        names = ", ".join(f"{n} ({r})" for n, r in total.failed[:3]) + (" ..." if len(total.failed) > 3 else "")
        raise FlameError(
            f"{len(total.failed)} shard{'s' if len(total.failed) > 1 else ''} failed: {names}; "
            "the other shards are complete, rerun the same command to retry (failed shards go last)"
        )
    if total.done and not total.samples and len(EmbeddingStore(out)) == 0:  # a store with no sample at all
        raise FlameError(
            f"no samples were stored: the {total.done} shard{'s' if total.done > 1 else ''} done hold none "
            f"({total.missing:,} samples missing a caption, {total.empty:,} empty captions with --on-empty "
            f"{cfg.on_empty}); check --data, --captions and --prompts"
        )
    return 0
