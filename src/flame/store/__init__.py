"""The embedding store: one memory-mappable array per input shard plus a manifest.

Layout (everything written to a temporary name, fsynced, then renamed via flame.fileio;
`NAME.keys.json` is written last, so its presence marks a shard complete):

    STORE/manifest.json            format, version, LLM spec + fingerprint, layer, positions,
                                   prompt sets, facet names, K, D, dtype, normalized
    STORE/shards/NAME.npy          [N, K, D] float16 or int8 (np.save format)
    STORE/shards/NAME.scale        [N, K] float32 (np.save format), int8 stores only (x = q * scale);
                                   no shard name can produce a file ending in `.scale` (stores
                                   written before used NAME.scale.npy, which is still read)
    STORE/shards/NAME.keys.json    the N webdataset `__key__`s in row order
    STORE/attempts/NAME.json       written by `flame embed` while a shard is attempted or after it
                                   failed (so a rerun tries it last); removed once it is complete

int8 uses one symmetric scale per vector: scale = max|x| / 127, q = round(x / scale).

Reading is checked and bounded: a shard is validated against the manifest when it is opened
(npy header, dtype, [N, K, D], file size, N against its keys; no data is read), at most
`max_open` shards are kept open (an LRU: memory maps hold one file descriptor each), keys are
indexed compactly (sorted UTF-8 bytes in one buffer + offsets and rows, len(key) + 8 bytes
per key), and no non-finite vector is ever written or handed out.
"""

from flame.store.folder import EmbeddingStore, KeyIndex
from flame.store.format import (
    ATTEMPTS,
    DISK_FULL,
    DTYPES,
    FORMAT,
    VERSION,
    NonFiniteShard,
    StoreFull,
    manifest_bytes,
    manifest_difference,
    quantize_int8,
)
from flame.store.lock import StoreLock
from flame.store.writer import ShardWriter

__all__ = [
    "ATTEMPTS",
    "DISK_FULL",
    "DTYPES",
    "FORMAT",
    "VERSION",
    "EmbeddingStore",
    "KeyIndex",
    "NonFiniteShard",
    "ShardWriter",
    "StoreFull",
    "StoreLock",
    "manifest_bytes",
    "manifest_difference",
    "quantize_int8",
]
