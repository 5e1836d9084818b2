"""Fault injection for the kill and fault tests: the one place that reads `FLAME_TEST_*`.

Both hooks are inert unless their variable is set, and cost one environment lookup.
- `FLAME_TEST_KILL_AT=N`: the process SIGKILLs itself at its N-th durable step (before and
  after each rename in `flame.fileio`), so a test can stop a job between any two writes.
- `FLAME_TEST_SLOW_BATCH=S`: sleep S seconds per encoded batch in `flame embed`, widening the
  window in which a test kills a job mid-shard.
"""

from __future__ import annotations

import os
import signal
import time

_steps = 0  # durable steps taken by this process


def durable_step() -> None:
    """Count one durable step; die here if FLAME_TEST_KILL_AT names it."""
    target = os.environ.get("FLAME_TEST_KILL_AT")
    if not target:
        return
    global _steps
    _steps += 1
    if _steps == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def slow_batch() -> None:
    """Sleep FLAME_TEST_SLOW_BATCH seconds (0 when unset)."""
    delay = float(os.environ.get("FLAME_TEST_SLOW_BATCH", "0") or 0)
    if delay > 0:
        time.sleep(delay)
