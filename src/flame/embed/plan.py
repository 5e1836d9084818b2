"""What a `flame embed` run works on, resolved from its Config before anything loads: the
input shards, the caption tables, the caption source of each prompt set, the layer; and the
store manifest those settings imply."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from flame.data.captions import CaptionTable
from flame.data.shards import unique_shards
from flame.embed.config import Config
from flame.errors import FlameError
from flame.prompts import DEFAULT_MAX_CAPTION_TOKENS, PromptSet, load_prompt_set

log = logging.getLogger("flame.embed")


@dataclass
class Source:
    """One prompt set and where its captions come from (a member extension or a table column)."""

    prompts: PromptSet
    spec: str  # as typed
    ext: str | None = None  # shard member extension
    table: str | None = None  # table name
    column: str | None = None
    offset: int = 0  # first facet column in the store


@dataclass
class Plan:
    shards: list[Path]
    sources: list[Source]
    tables: dict[str, Path]
    out: Path
    layer: list[int]


def make_plan(cfg: Config) -> Plan:
    """Resolve and check the inputs: one FlameError before any model loads."""
    tables = parse_tables(cfg.captions)
    sources = parse_sources(cfg.prompts, tables)
    return Plan(input_shards(cfg), sources, tables, output_folder(cfg), cfg.layers)


def input_shards(cfg: Config) -> list[Path]:
    """`--data` expanded; store shards are named by file name, so names must be unique."""
    return unique_shards(cfg.data)


def output_folder(cfg: Config) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise FlameError(f"--out {out} exists and is not a folder")
    return out


def parse_tables(specs: list[str]) -> dict[str, Path]:
    """`--captions [NAME=]FILE ...` -> name -> file (NAME defaults to the file's stem)."""
    tables: dict[str, Path] = {}
    for spec in specs or []:
        name, sep, file = spec.partition("=")
        if not sep:
            name, file = Path(spec).stem, spec
        if not name or not file:
            raise FlameError(f"--captions {spec!r}: expected FILE or NAME=FILE")
        if name in tables and tables[name] != Path(file):
            raise FlameError(f"--captions: two tables are named {name!r}; name them with NAME=FILE")
        if not Path(file).is_file():
            raise FlameError(f"caption table not found: {file}")
        tables[name] = Path(file)
    return tables


def parse_sources(specs: list[str], tables: dict[str, Path]) -> list[Source]:
    """`--prompts SET=SOURCE ...` -> the sources in order, each with its first facet column."""
    sources: list[Source] = []
    for spec in specs:
        set_name, sep, src = spec.partition("=")
        if not sep or not set_name or not src:
            raise FlameError(f"--prompts {spec!r}: expected SET=SOURCE, e.g. raw=txt or long=recap:long_caption")
        prompts = load_prompt_set(set_name)
        if any(s.prompts.name == prompts.name for s in sources):
            raise FlameError(f"--prompts: prompt set {prompts.name!r} is given twice")
        if ":" in src:
            table, _, column = src.rpartition(":")
            if table not in tables:
                known = ", ".join(tables) or "none given"
                raise FlameError(
                    f"--prompts {spec!r}: no caption table named {table!r} (tables: {known}); add --captions NAME=FILE"
                )
            sources.append(Source(prompts, spec, table=table, column=column))
        else:
            if not src.replace("_", "").replace(".", "").isalnum():
                raise FlameError(f"--prompts {spec!r}: {src!r} is not a member extension like txt")
            sources.append(Source(prompts, spec, ext=src.lower()))
    offset = 0
    for s in sources:
        s.offset, offset = offset, offset + s.prompts.k
    return sources


def load_tables(plan: Plan, key_field: str, keys: set[str] | None = None) -> dict[str, CaptionTable]:
    """The caption tables with the columns the sources use, only rows whose key is in `keys`."""
    tables = {name: CaptionTable(path, key_field=key_field) for name, path in plan.tables.items()}
    for s in plan.sources:
        if s.table:
            tables[s.table].load([c.column for c in plan.sources if c.table == s.table], keys=keys)
    for name, t in tables.items():
        if t.duplicates:
            log.warning("caption table %s: %d repeated keys (the first row of each key is used)", name, t.duplicates)
    return tables


def manifest(cfg: Config, plan: Plan, encoders, fingerprint: str) -> dict:
    """The store manifest this run writes (or must match to resume)."""
    sets = []
    for s in plan.sources:
        src = s.ext if s.ext else f"{plan.tables[s.table].name}:{s.column}"
        sets.append({**s.prompts.to_dict(), "source": src})
    return {
        "format": "flame-embeddings",
        "version": 1,
        "llm": {"spec": str(cfg.llm), "fingerprint": fingerprint},
        "layer": encoders[0].layer,
        "positions": cfg.positions,
        # recorded only when not the default, so stores made before the cap existed still resume
        **({"max_caption_tokens": cfg.max_caption_tokens}
           if cfg.max_caption_tokens != DEFAULT_MAX_CAPTION_TOKENS else {}),
        "prompt_sets": sets,
        "facets": [f"{s.prompts.name}/{i}" for s in plan.sources for i in range(s.prompts.k)],
        "k": sum(e.k for e in encoders),
        "dim": encoders[0].dim,
        "dtype": cfg.dtype,
        "normalized": True,
    }


def accept_legacy_fingerprint(manifest: dict, out: Path, legacy: str) -> dict:
    """A store stamped with the dtype-dependent fingerprint of these very weights (as flame
    wrote before) is the same store: keep its value so the manifest still matches."""
    try:
        old = json.loads((out / "manifest.json").read_text())
        recorded = old["llm"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return manifest
    if recorded == legacy and recorded != manifest["llm"]["fingerprint"]:
        return {**manifest, "llm": {**manifest["llm"], "fingerprint": recorded}}
    return manifest
