"""The run folder `flame train` writes: its file names, the ledger and "the latest checkpoint".

One home for these rules, read by training (resume, pruning) and by `FlameModel` loading a
run folder (`flame.model.resolve_model_folder`), so both agree on which checkpoint is latest.

    RUN/train-config.json     resolved settings (a resume must match them unless --force)
    RUN/checkpoint-STEP/      model.safetensors + config.json (FlameModel) + state.pt
    RUN/latest                name of the newest complete checkpoint
    RUN/checkpoints.json      {"written": [names]}: checkpoints in the order they were written
    RUN/.lock                 held by the one job training in RUN (flame.lock.FileLock)
    RUN/log.jsonl, RUN/tensorboard/

The latest checkpoint is the one `latest` names if it is complete, else the most recently
written complete one in the ledger, else the complete one with the highest step (a folder
whose ledger was lost). Write order, not step order: after a resume from an older checkpoint
the new checkpoints are the newest even where abandoned ones have higher steps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from flame.errors import FlameError
from flame.fileio import TMP_SUFFIX, write_atomic

STATE = "state.pt"
MODEL_FILES = ("model.safetensors", "config.json")  # what loading a model needs
CHECKPOINT_FILES = (*MODEL_FILES, STATE)  # what resuming needs
TRAIN_CONFIG = "train-config.json"
LEDGER = "checkpoints.json"
LATEST = "latest"
LOCK = ".lock"
PREFIX = "checkpoint-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def step_of(path: Path) -> int | None:
    """The step of a `checkpoint-STEP` folder name (None for any other name)."""
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if path.name.startswith(PREFIX) and tail.isdigit() else None


def checkpoints(run: Path) -> list[Path]:
    """Every `checkpoint-STEP` folder (complete or not), by step."""
    return sorted((p for p in run.glob(PREFIX + "*") if step_of(p) is not None), key=step_of)


def is_complete(ckpt: Path, files: Sequence[str] = CHECKPOINT_FILES) -> bool:
    return all((ckpt / name).is_file() for name in files)


def read_ledger(run: Path) -> list[str]:
    """Checkpoint names in the order they were written ([] if the ledger is missing or unreadable)."""
    try:
        written = json.loads((run / LEDGER).read_text()).get("written", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in written]


def inside(run: Path, name: str) -> bool:
    """`name` is one plain entry of `run` (no separator, `..`, absolute path, or a symlink
    leading out of the run folder)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return False
    try:
        return (run / name).resolve().parent == run.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _named(run: Path, name: str, source: Path) -> Path:
    if not inside(run, name):
        raise FlameError(
            f"{source} names {name!r}, which is not a checkpoint folder inside {run}: refusing it "
            f"(a run folder's {LATEST} and {LEDGER} hold plain checkpoint names; fix or delete {source.name})"
        )
    return run / name


def latest_checkpoint(run: Path, files: Sequence[str] = CHECKPOINT_FILES) -> Path | None:
    """The latest complete checkpoint of `run` (see the module docstring), or None.
    `files`: what "complete" needs (MODEL_FILES to load a model, CHECKPOINT_FILES to resume).
    A `latest` or ledger naming anything but a folder inside `run` is one FlameError."""
    marker = run / LATEST
    if marker.is_file():
        name = marker.read_text(errors="replace").strip()
        if name and is_complete(_named(run, name, marker), files):
            return run / name
    for name in reversed(read_ledger(run)):
        if is_complete(_named(run, name, run / LEDGER), files):
            return run / name
    found = [p for p in checkpoints(run) if inside(run, p.name) and is_complete(p, files)]
    return found[-1] if found else None


def write_file(path: Path, text: str) -> None:
    """write_atomic, with a full disk as one FlameError (the old file stays as it was)."""
    try:
        write_atomic(path, text)
    except OSError as e:
        path.with_name(path.name + TMP_SUFFIX).unlink(missing_ok=True)
        raise FlameError(f"cannot write {path} ({e.strerror or e}): free some space and rerun with --resume") from None


def write_ledger(run: Path, names: list[str]) -> None:
    write_file(run / LEDGER, json.dumps({"written": names}) + "\n")


def write_latest(run: Path, name: str) -> None:
    write_file(run / LATEST, name + "\n")
