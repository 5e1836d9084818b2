"""Weighted data mixes: `--data SPEC::WEIGHT` sources and the resampled order they are read in.

A source is one `--data` spec (brace pattern, glob, folder, files) with an optional weight,
written after `::` (`'cc12m/{00000..01242}.tar::3'`). A weight is a share of the *samples*
drawn: with weights 3 and 1, three of every four samples come from the first source, whatever
the sources' sizes. A source given without a weight has weight 1.

The resampled order (`ResampledOrder`, one per logical data worker) draws with replacement:
- each sample's source is drawn by weight (blocks of `BLOCK` draws from one generator seeded by
  (seed, generation, worker, block)), so the shares hold at any scale, not only on average over
  many shards;
- each source reads whole shards, one after the other, each drawn uniformly with replacement
  from the source's shards by (seed, generation, worker, source, draw), so every sample of a
  source is equally likely (open_clip's `--dataset-resampled`, per source).
Nothing is kept of past draws but counters: the position is (samples drawn, and per source the
shard draw and the samples read of it), which a resumed worker re-derives exactly (reading but
not decoding the skipped samples of the current shards). `generation` starts a fresh,
independent sequence (a resume with another worker layout).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from flame.errors import FlameError

SEPARATOR = "::"
BLOCK = 4096  # source draws made at once


@dataclass(frozen=True)
class Source:
    spec: str  # the shard spec, without its weight
    weight: float | None  # None: no weight given


def parse_source(text: str) -> Source:
    """`SPEC` or `SPEC::WEIGHT` -> Source; a weight that is not a positive finite number, or a
    `::` with nothing on one side, is one FlameError line."""
    text = str(text)
    if SEPARATOR not in text:
        return Source(text, None)
    spec, _, weight = text.rpartition(SEPARATOR)
    if not spec:
        raise FlameError(f"--data {text!r}: no shards before '::' (write SHARDS::WEIGHT)")
    if not weight.strip():
        raise FlameError(f"--data {text!r}: no weight after '::' (write SHARDS::WEIGHT, e.g. {spec}::1)")
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise FlameError(f"--data {text!r}: the weight {weight!r} must be a positive number")
    return Source(spec, value)


def parse_sources(specs: str | Sequence[str]) -> list[Source]:
    return [parse_source(s) for s in ([specs] if isinstance(specs, str) else specs)]


def weighted(sources: Sequence[Source]) -> bool:
    return any(s.weight is not None for s in sources)


def shares(weights: Sequence[float]) -> list[float]:
    """Weights -> probabilities (they sum to 1)."""
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) % 2**32 for k in key])


class ResampledOrder:
    """The samples one logical worker reads, as (tar sample, source, visit id), forever.

    `sources`: per source its shard paths; `weights`: per source. `position` (from a checkpoint,
    `[drawn, draw_0, read_0, draw_1, read_1, ...]`) continues a sequence; `position()` gives the
    one after the last sample yielded. The visit id tells two reads of one shard apart (it seeds
    the crops and facet choices, as the epoch does in the epoch stream)."""

    def __init__(self, sources: Sequence[Sequence[str]], weights: Sequence[float], *, seed: int, generation: int,
                 worker: int, workers: int, position: Sequence[int] = ()):
        self.sources = [list(s) for s in sources]
        self.p = np.asarray(shares(weights))
        self.key = (seed, generation, worker)
        self.workers, self.worker = workers, worker
        n = len(self.sources)
        pos = list(position) if len(position) == 1 + 2 * n else [0] * (1 + 2 * n)
        self.drawn = pos[0]
        self.draw = pos[1::2]
        self.read = pos[2::2]
        self._block: tuple[int, np.ndarray] | None = None
        self._open: dict[int, Iterator[dict]] = {}

    def position(self) -> list[int]:
        return [self.drawn, *(v for pair in zip(self.draw, self.read) for v in pair)]

    def source_of(self, j: int) -> int:
        """The source of sample j (0-based) of this worker."""
        b = j // BLOCK
        if self._block is None or self._block[0] != b:
            self._block = (b, _rng(*self.key, b).choice(len(self.p), size=BLOCK, p=self.p))
        return int(self._block[1][j % BLOCK])

    def shard_of(self, source: int, draw: int) -> str:
        shards = self.sources[source]
        return shards[int(_rng(*self.key, 1 + source, draw, 7).integers(len(shards)))]

    def visit(self, source: int) -> int:
        """A number unique to (generation, worker, source, draw)."""
        return ((self.key[1] * self.workers + self.worker) * len(self.sources) + source) * 1_000_003 \
            + self.draw[source]

    def _samples(self, source: int) -> Iterator[dict]:
        """The current shard's samples of `source`, past the ones already read."""
        import webdataset as wds

        url = self.shard_of(source, self.draw[source])
        stream = wds.tarfile_samples([{"url": url}], handler=wds.warn_and_continue)
        for _ in range(self.read[source]):
            if next(stream, None) is None:
                break
        return stream

    def _next_of(self, source: int) -> dict:
        empty = 0
        while True:
            if source not in self._open:
                self._open[source] = self._samples(source)
            sample = next(self._open[source], None)
            if sample is not None:
                self.read[source] += 1
                return sample
            del self._open[source]
            self.draw[source], self.read[source] = self.draw[source] + 1, 0
            empty = empty + 1
            if empty > 4 * len(self.sources[source]) + 16:  # every draw gives nothing: unreadable shards
                raise RuntimeError(f"data worker {self.worker}: found no usable samples in the "
                                   f"{len(self.sources[source])} shard(s) of source {source + 1}")

    def __iter__(self) -> Iterator[tuple[dict, int, int]]:
        while True:
            source = self.source_of(self.drawn)
            sample = self._next_of(source)  # (an empty shard is skipped: the next draw is read)
            self.drawn += 1
            yield sample, source, self.visit(source)


__all__ = ["BLOCK", "ResampledOrder", "Source", "parse_source", "parse_sources", "shares", "weighted"]
