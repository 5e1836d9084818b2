"""The host work of `flame embed` on a prefetch thread, so the model never waits for it (issue 15,
item 11): the next shard's tar and caption rows, and the next chunks' tokens and batch tensors, are
made while the model runs the current ones.

`prefetched(items)` iterates `items` on one daemon thread, at most `depth` ahead (a bounded queue:
memory stays a few chunks). What the caller sees is what iterating `items` itself would give, in
order: the same values, and an error raised while making one is raised, as itself, where that value
would have come (so the run reports it in its one line and decides, as before, whether it skips a
shard or stops the run). Nothing the thread does is durable: every store write, fsync and rename
stays on the caller's thread in the order it had, so a kill at any point leaves what it left
before. Leaving the loop early (an error, Ctrl-C, SIGTERM's exception) stops the thread at its next
item and joins it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
_END = object()
JOIN_SECONDS = 30.0  # a thread still inside one item (a huge tar) is left to die with the process


class _Thread:
    def __init__(self, items: Iterable[T], depth: int, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _fill(self, items: Iterable[T]) -> None:
        try:
            for item in items:
                if not self._put((item, None)):
                    return
        except BaseException as e:  # handed to the consumer, raised there as itself
            self._put((None, e))
            return
        self._put((_END, None))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(JOIN_SECONDS)


@contextmanager
def prefetched(items: Iterable[T], depth: int = 2, enabled: bool = True,
               name: str = "flame-embed-prefetch") -> Iterator[Iterable[T]]:
    """`items`, made on a prefetch thread up to `depth` ahead (`enabled=False`: in the caller's thread)."""
    if not enabled:
        yield items
        return
    thread = _Thread(items, depth, name)
    try:
        yield thread
    finally:
        thread.close()
