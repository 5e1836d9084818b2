"""One rank's part of a `flame embed` job: take the store, encode its share of the shards
still to do, and hand its counters to rank 0, which reports the whole job.

A fixed split: rank r takes shards r, r + WORLD_SIZE, ... of the input list, so each rank knows
its shards before anything loads and keeps only their table rows (YFCC15M's long captions are
GBs). Rank 0 alone holds the lock and opens the store; the process group carries only those
decisions (`distributed.decide`) and the final counters."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

from flame import distributed
from flame.data.shards import ShardError, readable_tar_keys, shard_name
from flame.embed.config import Config
from flame.embed.encode import encode_shard, load_encoders
from flame.embed.plan import Plan, accept_legacy_fingerprint, load_tables, manifest
from flame.embed.report import Stats, note, summary, verdict
from flame.embed.rows import shard_rows
from flame.errors import FlameError, first_line
from flame.store import DISK_FULL, EmbeddingStore, NonFiniteShard, StoreLock

log = logging.getLogger("flame.embed")

# Errors of one shard that skip it (reported, exit 2 at the end, retried last by a rerun);
# anything else that is not an `Exception` (KeyboardInterrupt...), a FlameError (the user
# asked to stop, the disk is full) or MemoryError stops the run.
MAX_UNEXPECTED_IN_A_ROW = 3


def run_job(cfg: Config, plan: Plan, device: str) -> int:
    """Every rank calls this; rank 0 prints the summary and returns the job's verdict."""
    t0 = time.perf_counter()
    held: list[StoreLock] = []
    distributed.decide(lambda: held.append(StoreLock(plan.out, notify=note)))  # rank 0 holds it
    try:
        everyone, skipped = _work(cfg, plan, device)
    finally:
        for lock in held:
            lock.release()
    if not distributed.is_main():
        # rank 0 reports the whole job and exits non-zero if anything failed; exiting 0 here
        # keeps torchrun from stopping rank 0 before it has printed
        return 0
    total = Stats.total(everyone)
    summary(cfg, plan.out, total, skipped, time.perf_counter() - t0)
    return verdict(cfg, plan.out, total)


def _work(cfg: Config, plan: Plan, device: str) -> tuple[list[Stats], int]:
    """-> (every rank's counters, shards skipped as already complete)."""
    rank, world = distributed.rank(), distributed.world_size()
    assigned = {str(p) for p in plan.shards[rank::world]}
    tables = load_tables(plan, cfg.key_field, keys=readable_tar_keys(sorted(assigned)) if plan.tables else None)
    model, encoders, fingerprint = load_encoders(cfg, plan, device)
    ours = manifest(cfg, plan, encoders, fingerprint)
    todo = distributed.decide(lambda: _open_store(cfg, plan, ours, model))
    mine = [(name, Path(path)) for name, path in todo if path in assigned]
    stats = _encode_all(EmbeddingStore(plan.out), mine, cfg, plan, tables, encoders)
    everyone = distributed.all_gather_object(stats)
    distributed.leave_together()  # every rank is here: no send left in flight at exit
    return everyone, len(plan.shards) - len(todo)


def _open_store(cfg: Config, plan: Plan, ours: dict, model) -> list[tuple[str, str]]:
    """(Rank 0) create or check the store; -> the shards still to do, in the order to do them."""
    from flame.llm import legacy_llm_fingerprint

    ours = accept_legacy_fingerprint(ours, plan.out, legacy_llm_fingerprint(model))
    store = EmbeddingStore.create(plan.out, ours, overwrite=cfg.overwrite)
    store.clean_temporaries()
    tried = store.attempts()
    for name in tried:
        if store.is_complete(name):  # completed just before a kill
            store.clear_attempt(name)
    todo = [(shard_name(p), str(p)) for p in plan.shards if not store.is_complete(shard_name(p))]
    # shards that failed, or were being written when a job died, go last: a poison pill
    # never holds up the rest (stable sort: the input order otherwise)
    return sorted(todo, key=lambda t: tried.get(t[0], {}).get("attempts", 0) if t[0] in tried else 0)


def _progress_bar(n_shards: int):
    if not distributed.is_main():
        return None
    from flame.progress import progress

    world = distributed.world_size()
    rank = f" (rank 0 of {world})" if world > 1 else ""
    return progress(total=0, unit="cap", desc=f"embed {n_shards} shards{rank}")


def _encode_all(store: EmbeddingStore, mine: list[tuple[str, Path]], cfg: Config, plan: Plan, tables,
                encoders) -> Stats:
    """This rank's shards, one by one; a failing shard is reported and skipped."""
    stats = Stats()
    bar = _progress_bar(len(mine))
    truncated0 = [e.truncated for e in encoders]
    per_shard: list[int] = []  # captions per shard so far: the bar's total is projected from them
    unexpected = 0  # failures in a row that are not bad data
    for i, (name, path) in enumerate(mine):
        store.record_attempt(name)
        try:
            keys, captions = shard_rows(name, path, plan, tables, stats, on_missing=cfg.on_missing,
                                        on_empty=cfg.on_empty)
            per_shard.append(len(keys) * len(plan.sources))
            if bar is not None:  # total = work so far + this shard + the rest at the mean shard size
                bar.total = sum(per_shard) + (len(mine) - i - 1) * int(np.mean(per_shard))
                bar.refresh()
            _write_shard(store, name, keys, captions, plan, encoders, cfg, stats, bar)
        except BaseException as e:
            if stops_the_run(e):
                raise
            unexpected = _failed(store, name, e, stats, bar, unexpected)
            continue
        store.clear_attempt(name)
        unexpected = 0
        stats.samples += len(keys)
        stats.done += 1
    stats.truncated = sum(e.truncated - t for e, t in zip(encoders, truncated0))
    if bar is not None:
        bar.close()
    return stats


def _write_shard(store: EmbeddingStore, name: str, keys, captions, plan: Plan, encoders, cfg: Config, stats: Stats,
                 bar) -> None:
    writer = store.shard_writer(name, len(keys))
    try:
        encode_shard(writer, captions, plan, encoders, cfg.chunk, stats, bar, prefetch=cfg.prefetch)
        stats.bytes += writer.commit(keys)
    except BaseException:
        writer.abort()
        raise


def _failed(store: EmbeddingStore, name: str, e: BaseException, stats: Stats, bar, unexpected: int) -> int:
    """Report and record one failed shard; -> the count of unexpected failures in a row (too
    many stop the run: a problem of the setup or a bug, not of one shard's data)."""
    reason = reason_of(e)
    stats.failed.append((name, reason))
    store.record_attempt(name, reason)
    msg = f"flame embed: shard {name} failed: {reason} (skipped; the other shards go on)"
    (bar.write if bar is not None else print)(msg, file=sys.stderr)
    log.debug("shard %s failed", name, exc_info=True)
    unexpected = 0 if isinstance(e, ShardError | NonFiniteShard) else unexpected + 1
    if unexpected >= MAX_UNEXPECTED_IN_A_ROW:
        raise FlameError(
            f"{unexpected} shards in a row failed with unexpected errors (last: {reason}); stopping: "
            "this looks like a problem of the setup or a bug, not of one shard's data "
            "(--debug shows the traceback)"
        ) from e
    return unexpected


def stops_the_run(e: BaseException) -> bool:
    if isinstance(e, ShardError | NonFiniteShard):
        return False
    if isinstance(e, FlameError | MemoryError) or not isinstance(e, Exception):
        return True
    return isinstance(e, OSError) and e.errno in DISK_FULL


def reason_of(e: BaseException) -> str:
    if isinstance(e, FlameError):
        return str(e)
    text = first_line(e, 300)
    return text if text == e.__class__.__name__ else f"{e.__class__.__name__}: {text}"
