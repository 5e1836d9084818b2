"""Read the history of a W&B run file (`run-ID.wandb`, what an offline run writes) without a
server: the file is a 7-byte header (":W&B", magic, version) and then LevelDB-log records (32 KiB
blocks; each chunk: crc32c (4), length (2, little-endian), type (1: full, 2: first, 3: middle,
4: last)) holding wandb's own `Record` protobufs. Written for the tests from that layout."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> Iterator[object]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def history(path: Path) -> dict[int, dict]:
    """step -> the metrics logged at that step (wandb's own `_step`, `_runtime`... left out)."""
    rows: dict[int, dict] = {}
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        rows.setdefault(int(items["_step"]), {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return rows
