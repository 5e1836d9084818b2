"""`flame embed`: run a frozen LLM once over every caption of a corpus and store the
L2-normalised facet embeddings, one store shard per input tar shard.

Captions come from text members of the tar shards (`txt`, never decoding images) and/or
from caption tables keyed by `__key__`. `--prompts SET=SOURCE ...` maps each prompt set
to its caption source; facets are stored in the order the sets are given.

Scale-out: under torchrun rank r takes shards r, r + WORLD_SIZE, ... of the input list that
are still to do, and reads only those shards' rows of the caption tables (rank 0 holds the
store lock and checks the manifest; the process group carries only that decision and the
final summary). `--devices cuda:0,cuda:1` does the same from one command by starting one
worker per device. Rerunning the command skips complete shards; everything is written to
temporary names and renamed, and shard bytes depend only on the shard's own captions, so a
killed run resumed ends byte-identical to an uninterrupted one.

The package, in the order a run uses it: `config` (the settings), `plan` (inputs and the
store manifest resolved from them), `run` (the entry point), `worker` (one rank's loop),
`rows` (one shard's captions), `encode` (the LLM), `report` (counters and summary),
`dryrun` (--dry-run), `spawn` (--devices).
"""

from flame.embed.config import EPILOG, Config
from flame.embed.plan import Plan, Source
from flame.embed.report import Stats
from flame.embed.run import main

DESCRIPTION = "captions (webdataset shards, caption tables) -> facet embedding store"

__all__ = ["DESCRIPTION", "EPILOG", "Config", "Plan", "Source", "Stats", "main"]
