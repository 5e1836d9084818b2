"""The checkpointer: write, prune and delete checkpoints atomically; read `state.pt` safely.

Names, the ledger and "the latest checkpoint" are `flame.runfolder`'s. A checkpoint is written
into a temporary folder, fsynced and renamed, so a killed job never leaves a half checkpoint
under its final name; deleting renames first for the same reason. `state.pt` holds only
tensors and plain data and is read weights-only (`flame.weights`): a checkpoint from someone
else cannot run code. Rank 0 alone writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from flame.errors import FlameError, first_line
from flame.fileio import fsync_dir, remove_stale_temporaries, replace
from flame.lock import FileLock
from flame.runfolder import (
    LATEST,
    LEDGER,
    LOCK,
    STATE,
    TRAIN_CONFIG,
    checkpoint_name,
    checkpoints,
    latest_checkpoint,
    read_ledger,
    write_file,
    write_latest,
    write_ledger,
)
from flame.weights import load_torch

log = logging.getLogger("flame.train")


def load_state(ckpt: Path) -> dict:
    """state.pt as plain data only: tensors, numbers, strings, lists, dicts. Anything else is
    refused before it is unpickled (a pickle can run code)."""
    path = ckpt / STATE
    try:
        state = load_torch(path, "training state")
    except FlameError as e:
        raise FlameError(f"{e}; resume from another checkpoint") from None
    missing = [k for k in ("step", "optimizer", "scheduler", "rng") if not isinstance(state, dict) or k not in state]
    if missing:
        raise FlameError(f"{path} is not a flame train state (no {missing[0]!r})")
    return state


class _KeepWriteError:
    """File wrapper that keeps the OSError of a failed write: torch.save reports a full disk only
    as an opaque 'unexpected pos' RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_state(path: Path, state: dict) -> None:
    with open(path, "wb") as f:
        sink = _KeepWriteError(f)
        try:
            torch.save(state, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def save_checkpoint(run: Path, step: int, model, state: dict, keep: int) -> Path:
    """Rank 0 only. The checkpoint is written into a temporary folder, fsynced and renamed (see
    flame.fileio.replace); then the ledger and RUN/latest are updated, then old ones pruned. A
    failed write (full disk) removes the temporary folder, leaves every earlier checkpoint and
    `latest` as they were, and raises one FlameError."""
    final = run / checkpoint_name(step)
    tmp = run / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save(tmp)
        _write_state(tmp / STATE, state)
        if final.exists():  # a resume from an older checkpoint writes this step again
            aside = run / f".{final.name}.tmp-old-{os.getpid()}"
            os.replace(final, aside)
            replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            replace(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        prev = latest_checkpoint(run)
        raise FlameError(
            f"cannot write checkpoint {final} ({reason}); the earlier checkpoints are intact"
            f"{f' (latest: {prev.name})' if prev else ''}: free some space and rerun with --resume"
        ) from None
    write_ledger(run, [n for n in read_ledger(run) if n != final.name and (run / n).is_dir()] + [final.name])
    write_latest(run, final.name)
    prune(run, keep, protect={final.name})
    return final


def prune(run: Path, keep: int, protect: set[str]) -> None:
    """Keep the `keep` most recently written checkpoints (0: all), in write order (the ledger);
    checkpoints the ledger does not know count as older than any it does. Never deletes a name
    in `protect` (the one just written)."""
    if keep <= 0:
        return
    present = [p.name for p in checkpoints(run)]  # by step
    written = [n for n in read_ledger(run) if n in present]
    order = [n for n in present if n not in written] + written  # oldest first
    doomed = [n for n in order[:-keep] if n not in protect]
    for name in doomed:
        delete_checkpoint(run / name)
    if doomed:
        write_ledger(run, [n for n in written if n not in doomed])
        fsync_dir(run)


def delete_checkpoint(ckpt: Path) -> None:
    """Rename to a temporary name first, then delete: a checkpoint is never visible half deleted
    (a job killed meanwhile leaves a temporary folder, removed by the next start)."""
    doomed = ckpt.with_name(f".{ckpt.name}.tmp-del-{os.getpid()}")
    try:
        os.replace(ckpt, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def clean_temporaries(run: Path) -> None:
    """Remove what killed jobs left: temporary checkpoint folders, and the write_atomic
    temporaries of `latest` / the ledger whose writer is gone."""
    for p in run.glob(".checkpoint-*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    remove_stale_temporaries(run)


def start_over(run: Path) -> None:
    """--force without a resume: delete the old checkpoints, `latest` and the ledger (called only
    once every setting has been checked and the model built)."""
    for old in run.glob("checkpoint-*"):
        delete_checkpoint(old)
    for name in (LATEST, LEDGER):
        (run / name).unlink(missing_ok=True)
    fsync_dir(run)


def write_train_config(run: Path, settings: dict, world: int, steps: int, data: dict) -> None:
    write_file(run / TRAIN_CONFIG,
               json.dumps({"config": settings, "world_size": world, "steps": steps, "data": data}, indent=2) + "\n")


class RunLock:
    """RUN/.lock (`flame.lock.FileLock`), held by rank 0 for the whole job: a second `flame train`
    on the same folder is refused instead of deleting the first one's checkpoints and rewriting
    its log. A run folder this lock created and nothing was written to is removed again."""

    def __init__(self, run: Path):
        self.run = run
        self.created = not run.exists()
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FlameError(f"cannot use {run} as the run folder ({e.strerror or e})") from None
        warn = log.warning
        self.lock = FileLock(run / LOCK, busy=f"{run} is in use by another flame train",
                             hint="wait for it to end or choose another --out",
                             notify=lambda why: warn("%s: no other job can train in this folder meanwhile", why))

    def release(self) -> None:
        self.lock.release()
        if self.created and [p.name for p in self.run.iterdir()] == [LOCK]:  # nothing came of it
            (self.run / LOCK).unlink(missing_ok=True)
            try:
                self.run.rmdir()
            except OSError:
                pass
