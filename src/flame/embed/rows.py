"""One shard's rows: the keys kept and each source's captions, under the missing/empty rules."""

from __future__ import annotations

from pathlib import Path

from flame.data.captions import CaptionTable, ShardError, read_shard_captions
from flame.embed.plan import Plan
from flame.embed.report import Stats
from flame.errors import FlameError


def shard_rows(name: str, path: Path, plan: Plan, tables: dict[str, CaptionTable], stats: Stats, *,
               on_missing: str, on_empty: str) -> tuple[list[str], list[list[str]]]:
    """-> (keys kept, per-source caption lists). Raises ShardError for an unreadable tar or a
    shard none of whose samples has a caption; counts missing and empty captions in `stats`."""
    exts = {s.ext for s in plan.sources if s.ext}
    sc = read_shard_captions(path, exts)
    lookups = [sc.text[s.ext] if s.ext else tables[s.table].column(s.column) for s in plan.sources]
    keys: list[str] = []
    captions: list[list[str]] = [[] for _ in plan.sources]
    first_missing = None
    n_missing = 0
    for key in sc.keys:
        caps = [lk.get(key) for lk in lookups]
        if any(c is None for c in caps):
            src = plan.sources[next(i for i, c in enumerate(caps) if c is None)]
            where = f"member {key}.{src.ext}" if src.ext else f"key {key!r} in table {src.table} column {src.column!r}"
            if on_missing == "error":
                raise FlameError(
                    f"shard {name}: no caption for {src.prompts.name} ({where} is missing); "
                    "--on-missing skip leaves such samples out"
                )
            stats.missing += 1
            n_missing += 1
            first_missing = first_missing or where
            continue
        n_empty = sum(not c.strip() for c in caps)
        if n_empty:
            if on_empty == "error":
                raise FlameError(f"shard {name}: sample {key!r} has an empty caption; --on-empty embed|skip accepts it")
            stats.empty += n_empty
            if on_empty == "skip":
                continue
        keys.append(key)
        for i, c in enumerate(caps):
            captions[i].append(c)
    if sc.keys and n_missing == len(sc.keys):
        # not an empty shard to mark complete: a table or --prompts that does not fit this shard
        raise ShardError(
            f"all {n_missing} samples lack a caption (e.g. {first_missing} is missing); nothing is stored "
            "for it, check --captions/--prompts/--key-field"
        )
    return keys, captions
