"""`flame search`: text-to-image search over your own photo folder with a trained FLAME model.

    flame search index PHOTOS --model RUN [--index DIR]
    flame search query "a long description ..." --model RUN [--index DIR] [-k 10] [--html FILE]

The index (default PHOTOS/.flame-index) is an embedding store (`flame.store`) with K = 1:

    manifest.json                 format flame-embeddings, kind flame-image-index, the model's
                                  weight fingerprint, D, the image transform
    shards/batch-NNNNNN.npy       fp16 vectors of (at most COMMIT_EVERY) photos one run encoded
    shards/batch-NNNNNN.keys.json their paths relative to PHOTOS, in row order
    stats/batch-NNNNNN.npy        each row's photo size and mtime_ns
    log.jsonl                     append-only: which shards are committed and which of their rows
                                  are dead (see `flame.search.entries`); index.json: the photo folder

A rerun encodes only photos that are new or whose size or modification time changed, reuses
every other vector, and forgets deleted photos. Every COMMIT_EVERY photos a shard and one log
line are committed, so a killed run resumes from there, and indexing N photos writes O(N) bytes.
Shards left without live rows are removed and mostly-dead indexes are compacted, streamed. A
query scores block by block and keeps the top k: its memory does not grow with the index.
Unreadable photos are skipped and counted; names that are not UTF-8 are kept exactly.

Only an index this command made is ever replaced (`--rebuild`); an empty photo folder against
an index with photos is refused (`--allow-empty` forgets them all).

Modules: `index` (the scan and the indexing run), `entries` (the log of live rows), `compact`
(garbage collection), `query` (the query and reading an index), `sheet` (the HTML contact sheet),
`command` (the two actions' settings and output).
"""

from __future__ import annotations

from flame.search.command import ACTIONS, EPILOG, IndexConfig, QueryConfig
from flame.search.entries import LEGACY_FILES, LOG
from flame.search.index import (
    COMMIT_EVERY,
    INDEX_NAME,
    PHOTO_SUFFIXES,
    IndexReport,
    build_index,
    scan_photos,
)
from flame.search.query import (
    BLOCK,
    KIND,
    LONG_CHARS,
    LONG_WORDS,
    default_prompts,
    index_entries,
    load_index,
    search,
    shown,
)
from flame.search.sheet import contact_sheet

FILES = LEGACY_FILES  # the format-1 bookkeeping file, read and converted once

__all__ = [
    "ACTIONS", "BLOCK", "COMMIT_EVERY", "EPILOG", "FILES", "INDEX_NAME", "KIND", "LOG", "LONG_CHARS", "LONG_WORDS",
    "PHOTO_SUFFIXES", "IndexConfig", "IndexReport", "QueryConfig", "build_index", "contact_sheet",
    "default_prompts", "index_entries", "load_index", "scan_photos", "search", "shown",
]
