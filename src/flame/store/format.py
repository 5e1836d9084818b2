"""The store's format constants, its errors and the manifest comparison (see `flame.store`)."""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager

import numpy as np

from flame.errors import FlameError

FORMAT = "flame-embeddings"
VERSION = 1
DTYPES = {"fp16": np.float16, "int8": np.int8}
# Manifest fields that may differ between two runs writing the same store.
_IGNORED_IN_COMPARISON = {("llm", "spec")}
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
ATTEMPTS = "attempts"


class StoreFull(FlameError):
    """The disk (or quota, or file-size limit) ran out while writing: fatal for the run,
    complete shards stay valid."""


class NonFiniteShard(FlameError):
    """A shard's vectors hold NaN/inf (after quantisation): the shard is not committed."""


@contextmanager
def disk_errors(what: str):
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL:
            raise StoreFull(
                f"{os.strerror(e.errno).lower()} while writing {what}; the complete shards are kept, "
                "free space (or raise the limit) and rerun the same command"
            ) from e
        raise


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def manifest_difference(old: dict, new: dict) -> str | None:
    """None if a store with manifest `old` can take rows computed under `new`; otherwise
    a short description of the first difference (the LLM spec string itself may differ:
    the weights' fingerprint decides)."""
    keys = sorted(set(old) | set(new))
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if (key, sub) in _IGNORED_IN_COMPARISON:
                    continue
                if a.get(sub) != b.get(sub):
                    return f"{key}.{sub}: store has {_short(a.get(sub))}, this run {_short(b.get(sub))}"
        elif a != b:
            return f"{key}: store has {_short(a)}, this run {_short(b)}"
    return None


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quantize_int8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., D] float -> (int8 [..., D], float32 scale [...]) with x ~= q * scale."""
    x = np.asarray(vectors, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale
