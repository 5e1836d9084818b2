"""`flame search`: text-to-image search over your own photo folder with a trained FLAME model.

    flame search index PHOTOS --model RUN [--index DIR]
    flame search query "a long description ..." --model RUN [--index DIR] [-k 10] [--html FILE]

The index (default PHOTOS/.flame-index) is an embedding store (`flame.store`) with K = 1:

    manifest.json                 format flame-embeddings, kind flame-image-index, the model's
                                  weight fingerprint, D, the image transform
    shards/batch-NNNNNN.npy       fp16 vectors of the photos one indexing run encoded
    shards/batch-NNNNNN.keys.json their paths relative to PHOTOS
    files.json                    the live entries: path -> size, mtime_ns, shard, row. Written
                                  last and atomically: it is the commit point of a run

A rerun encodes only photos that are new or whose size or modification time changed, reuses
every other vector, and forgets deleted photos. Every COMMIT_EVERY photos a shard and files.json
are committed, so a killed run resumes from there. Shards left without live rows are removed and
mostly-dead shards are compacted. Unreadable photos are skipped and counted.

Modules: `index` (the index and the query over it), `sheet` (the HTML contact sheet),
`command` (the two actions' settings and output).
"""

from __future__ import annotations

from flame.search.command import ACTIONS, EPILOG, IndexConfig, QueryConfig
from flame.search.index import (
    BLOCK,
    COMMIT_EVERY,
    FILES,
    INDEX_NAME,
    KIND,
    LONG_CHARS,
    LONG_WORDS,
    PHOTO_SUFFIXES,
    IndexReport,
    build_index,
    default_prompts,
    load_index,
    scan_photos,
    search,
)
from flame.search.sheet import contact_sheet

__all__ = [
    "ACTIONS", "BLOCK", "COMMIT_EVERY", "EPILOG", "FILES", "INDEX_NAME", "KIND", "LONG_CHARS", "LONG_WORDS",
    "PHOTO_SUFFIXES", "IndexConfig", "IndexReport", "QueryConfig", "build_index", "contact_sheet",
    "default_prompts", "load_index", "scan_photos", "search",
]
