"""`flame embed`: run a frozen LLM once over every caption of a corpus and store the
L2-normalised facet embeddings, one store shard per input tar shard.

Captions come from text members of the tar shards (`txt`, never decoding images) and/or
from caption tables keyed by `__key__`. `--prompts SET=SOURCE ...` maps each prompt set
to its caption source; facets are stored in the order the sets are given.

Scale-out: under torchrun rank r takes shards r, r + WORLD_SIZE, ... of the input list that
are still to do, and reads only those shards' rows of the caption tables (rank 0 holds the
store lock and checks the manifest; the process group carries only that decision and the
final summary). `--devices cuda:0,cuda:1` does the
same from one command by starting one worker per device. Rerunning the command skips
complete shards; everything is written to temporary names and renamed, and shard bytes
depend only on the shard's own captions, so a killed run resumed ends byte-identical to
an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np

from flame import distributed, faults
from flame.data.captions import CaptionTable, ShardError, read_shard_captions
from flame.data.shards import readable_tar_keys, shard_name, unique_shards
from flame.errors import FlameError, first_line
from flame.prompts import DEFAULT_MAX_CAPTION_TOKENS, PromptSet, clean_caption, load_prompt_set
from flame.store import DISK_FULL, DTYPES, EmbeddingStore, NonFiniteShard, StoreLock
from flame.units import human_bytes, human_time

log = logging.getLogger(__name__)

EPILOG = """\
caption sources (--prompts SET=SOURCE):
  SET     a built-in prompt set (raw: 1 facet, short: 3, long: 7) or a YAML/JSON prompt-set file
  SOURCE  EXT          text of the shard member KEY.EXT, e.g. txt
          TABLE:COLUMN column COLUMN of a table given with --captions, found by the TABLE
                       name (--captions NAME=FILE) or the file's stem (--captions FILE)

  the paper's 11 embeddings per image (1 raw + 3 short + 7 long):
    flame embed --data 'cc3m/{00000..00575}.tar' --captions recap=cc3m_recaptions.json \\
        --prompts raw=txt short=recap:short_caption long=recap:long_caption \\
        --llm mistralai/Mistral-Nemo-Instruct-2407 --layer 39 --out cc3m-emb

  on 8 GPUs (one process per GPU; add --nnodes/--node_rank/--rdzv-endpoint for several machines):
    torchrun --nproc_per_node 8 -m flame embed ...same flags...

bad input: a shard that fails (unreadable tar, an error while encoding it, NaN/inf vectors,
no sample with a caption) is reported and skipped (exit 2 at the end; a rerun retries it, last;
STORE/attempts/ records it); a sample whose caption is missing (no KEY.EXT member, key not in the table, null
value) is left out of its shard's rows and counted (--on-missing skip), or stops the run
(--on-missing error); an empty caption is embedded as empty text and counted (--on-empty embed),
left out (skip) or stops the run (error).
"""


# ---- configuration ------------------------------------------------------------------------
@dataclass
class Source:
    prompts: PromptSet
    spec: str  # as typed
    ext: str | None = None  # shard member extension
    table: str | None = None  # table name
    column: str | None = None
    offset: int = 0  # first facet column in the store

    @property
    def describe(self) -> str:
        return self.ext if self.ext else f"{self.table}:{self.column}"


@dataclass
class Config:
    shards: list[Path]
    sources: list[Source]
    tables: dict[str, Path]
    out: Path
    layer: list[int]


def _parse_layer(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlameError(
            f"--layer: expected an integer or a comma-separated list (e.g. -2 or 38,39), not {text!r}"
        ) from None


def _parse_tables(specs: list[str]) -> dict[str, Path]:
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


def _parse_sources(specs: list[str], tables: dict[str, Path]) -> list[Source]:
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


def _config(args: argparse.Namespace) -> Config:
    if (args.batch_tokens is not None and args.batch_tokens < 1) or args.max_batch < 1 or args.chunk < 1:
        raise FlameError("--batch-tokens, --max-batch and --chunk must be positive")
    tables = _parse_tables(args.captions)
    sources = _parse_sources(args.prompts, tables)
    shards, out = input_shards_and_out(args)
    return Config(shards, sources, tables, out, _parse_layer(args.layer))


def input_shards_and_out(args: argparse.Namespace) -> tuple[list[Path], Path]:
    """`--data` expanded (store shards are named by file name, so names must be unique) and `--out`."""
    shards = unique_shards(args.data)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FlameError(f"--out {out} exists and is not a folder")
    return shards, out


# ---- distributed --------------------------------------------------------------------------
class _PeerFailed(Exception):
    """Rank 0 reported an error (and printed it); other ranks exit quietly."""


def _decide(fn):
    """Run `fn` on rank 0 and hand its result to every rank; a FlameError on rank 0 is
    raised there and turns into a quiet exit elsewhere."""
    if distributed.is_main():
        try:
            result = ("ok", fn())
        except FlameError as e:
            distributed.broadcast_object(("error", str(e)))
            raise
        return distributed.broadcast_object(result)[1]
    status, value = distributed.broadcast_object(None)
    if status != "ok":
        raise _PeerFailed(value)
    return value


def _note(message: str) -> None:
    print(f"flame embed: note: {message}", file=sys.stderr)


# ---- encoding -----------------------------------------------------------------------------
@dataclass
class Stats:
    samples: int = 0
    done: int = 0
    failed: list = field(default_factory=list)  # (name, reason)
    truncated: int = 0
    missing: int = 0
    empty: int = 0
    bytes: int = 0
    captions: int = 0
    repeats: int = 0
    tokens: int = 0


def _llm_dtype(name: str):
    import torch

    return {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_encoders(args, cfg: Config, device: str):
    from transformers.utils import logging as hf_logging

    from flame.facets import FacetEncoder
    from flame.llm import llm_fingerprint, load_llm

    hf_logging.disable_progress_bar()  # one progress bar per run: ours

    model, tokenizer = load_llm(args.llm, device=device, dtype=_llm_dtype(args.llm_dtype))
    encoders = [
        FacetEncoder(
            model,
            tokenizer,
            prompts=s.prompts,
            layer=cfg.layer,
            positions=args.positions,
            batch_tokens=args.batch_tokens,
            max_batch=args.max_batch,
            max_caption_tokens=args.max_caption_tokens,
        )
        for s in cfg.sources
    ]
    return model, encoders, llm_fingerprint(model)


def _manifest(args, cfg: Config, encoders, fingerprint: str) -> dict:
    sets = []
    for s in cfg.sources:
        src = s.ext if s.ext else f"{cfg.tables[s.table].name}:{s.column}"
        sets.append({**s.prompts.to_dict(), "source": src})
    return {
        "format": "flame-embeddings",
        "version": 1,
        "llm": {"spec": str(args.llm), "fingerprint": fingerprint},
        "layer": encoders[0].layer,
        "positions": args.positions,
        # recorded only when not the default, so stores made before the cap existed still resume
        **({"max_caption_tokens": args.max_caption_tokens}
           if args.max_caption_tokens != DEFAULT_MAX_CAPTION_TOKENS else {}),
        "prompt_sets": sets,
        "facets": [f"{s.prompts.name}/{i}" for s in cfg.sources for i in range(s.prompts.k)],
        "k": sum(e.k for e in encoders),
        "dim": encoders[0].dim,
        "dtype": args.dtype,
        "normalized": True,
    }


def _load_tables(args, cfg: Config, keys: set[str] | None = None) -> dict[str, CaptionTable]:
    tables = {name: CaptionTable(path, key_field=args.key_field) for name, path in cfg.tables.items()}
    for s in cfg.sources:
        if s.table:
            tables[s.table].load([c.column for c in cfg.sources if c.table == s.table], keys=keys)
    for name, t in tables.items():
        if t.duplicates:
            log.warning("caption table %s: %d repeated keys (the first row of each key is used)", name, t.duplicates)
    return tables


def _shard_rows(name: str, path: Path, cfg: Config, tables, args, stats: Stats):
    """-> (keys kept, per-source caption lists). Raises ShardError for an unreadable tar."""
    exts = {s.ext for s in cfg.sources if s.ext}
    sc = read_shard_captions(path, exts)
    lookups = [sc.text[s.ext] if s.ext else tables[s.table].column(s.column) for s in cfg.sources]
    keys: list[str] = []
    captions: list[list[str]] = [[] for _ in cfg.sources]
    first_missing = None
    n_missing = 0
    for key in sc.keys:
        caps = [lk.get(key) for lk in lookups]
        if any(c is None for c in caps):
            src = cfg.sources[next(i for i, c in enumerate(caps) if c is None)]
            where = f"member {key}.{src.ext}" if src.ext else f"key {key!r} in table {src.table} column {src.column!r}"
            if args.on_missing == "error":
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
            if args.on_empty == "error":
                raise FlameError(f"shard {name}: sample {key!r} has an empty caption; --on-empty embed|skip accepts it")
            stats.empty += n_empty
            if args.on_empty == "skip":
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


def _encode_shard(writer, keys, captions, cfg: Config, encoders, args, stats: Stats, bar) -> None:
    import torch
    import torch.nn.functional as F

    def progress(n_caps, n_tokens):
        stats.tokens += n_tokens
        if bar is not None:
            bar.update(n_caps)
            if not bar.disable:
                elapsed = max(time.perf_counter() - bar.start_t, 1e-9)
                bar.set_postfix_str(f"{stats.tokens / elapsed:,.0f} tok/s", refresh=False)

    for src, enc, caps in zip(cfg.sources, encoders, captions):
        facets = slice(src.offset, src.offset + src.prompts.k)
        first: dict[str, int] = {}
        unique, dup_dst, dup_src = [], [], []
        for row, cap in enumerate(caps):
            c = clean_caption(cap)
            if c in first:
                dup_dst.append(row)
                dup_src.append(first[c])
            else:
                first[c] = row
                unique.append(row)
        for start in range(0, len(unique), args.chunk):
            rows = unique[start : start + args.chunk]
            emb = enc.encode([caps[r] for r in rows], progress=progress)
            emb = F.normalize(emb.to(torch.float32), dim=-1).numpy()
            writer.write(np.asarray(rows), emb, facets=facets)
            faults.slow_batch()  # test hook: widens the window to kill a job mid-shard
        if dup_dst:  # repeated captions: copy the stored vectors, bytes identical to recomputing
            writer.copy_rows(np.asarray(dup_dst), np.asarray(dup_src), facets=facets)
            if bar is not None:
                bar.update(len(dup_dst))
        stats.captions += len(caps)
        stats.repeats += len(dup_dst)


# Errors of one shard that skip it (reported, exit 2 at the end, retried last by a rerun);
# anything else that is not an `Exception` (KeyboardInterrupt...), a FlameError (the user
# asked to stop, the disk is full) or MemoryError stops the run.
MAX_UNEXPECTED_IN_A_ROW = 3


def _stops_the_run(e: BaseException) -> bool:
    if isinstance(e, ShardError | NonFiniteShard):
        return False
    if isinstance(e, FlameError | MemoryError) or not isinstance(e, Exception):
        return True
    return isinstance(e, OSError) and e.errno in DISK_FULL


def _reason(e: BaseException) -> str:
    if isinstance(e, FlameError):
        return str(e)
    text = first_line(e, 300)
    return text if text == e.__class__.__name__ else f"{e.__class__.__name__}: {text}"


def _accept_legacy_fingerprint(manifest: dict, out: Path, legacy: str) -> dict:
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


def _embed(args, cfg: Config, device: str) -> int:
    t0 = time.perf_counter()
    held: list[StoreLock] = []
    _decide(lambda: held.append(StoreLock(cfg.out, notify=_note)))  # rank 0 holds it; the others learn the outcome
    try:
        # A fixed split: each rank knows its shards before anything loads and keeps only their
        # table rows (YFCC15M's long captions are GBs). Ranks progress alike, so what is left
        # after an interruption stays balanced.
        rank, world = distributed.rank(), distributed.world_size()
        assigned = {str(p) for p in cfg.shards[rank::world]}
        tables = _load_tables(args, cfg, keys=readable_tar_keys(sorted(assigned)) if cfg.tables else None)
        model, encoders, fingerprint = _load_encoders(args, cfg, device)
        manifest = _manifest(args, cfg, encoders, fingerprint)

        def open_store():
            from flame.llm import legacy_llm_fingerprint

            ours = _accept_legacy_fingerprint(manifest, cfg.out, legacy_llm_fingerprint(model))
            store = EmbeddingStore.create(cfg.out, ours, overwrite=args.overwrite)
            store.clean_temporaries()
            tried = store.attempts()
            for name in tried:
                if store.is_complete(name):  # completed just before a kill
                    store.clear_attempt(name)
            names = [shard_name(p) for p in cfg.shards]
            todo = [(n, str(p)) for n, p in zip(names, cfg.shards) if not store.is_complete(n)]
            # shards that failed, or were being written when a job died, go last: a poison pill
            # never holds up the rest (stable sort: the input order otherwise)
            return sorted(todo, key=lambda t: tried.get(t[0], {}).get("attempts", 0) if t[0] in tried else 0)

        todo = _decide(open_store)
        store = EmbeddingStore(cfg.out)
        skipped = len(cfg.shards) - len(todo)
        mine = [(name, path) for name, path in todo if path in assigned]
        stats = Stats()
        bar = None
        if rank == 0:
            from tqdm import tqdm

            bar = tqdm(
                total=0,
                unit="cap",
                desc=f"embed {len(mine)} shards" + (f" (rank 0 of {world})" if world > 1 else ""),
                disable=None,
                dynamic_ncols=True,
            )
        truncated0 = [e.truncated for e in encoders]
        per_shard: list[int] = []
        unexpected = 0  # failures in a row that are not bad data
        for i, (name, path) in enumerate(mine):
            store.record_attempt(name)
            writer = None
            try:
                keys, captions = _shard_rows(name, Path(path), cfg, tables, args, stats)
                per_shard.append(len(keys) * len(cfg.sources))
                if bar is not None:  # total = work so far + this shard + the rest at the mean shard size
                    bar.total = sum(per_shard) + (len(mine) - i - 1) * int(np.mean(per_shard))
                    bar.refresh()
                writer = store.shard_writer(name, len(keys))
                _encode_shard(writer, keys, captions, cfg, encoders, args, stats, bar)
                stats.bytes += writer.commit(keys)
            except BaseException as e:
                if writer is not None:
                    writer.abort()
                if _stops_the_run(e):
                    raise
                reason = _reason(e)
                stats.failed.append((name, reason))
                store.record_attempt(name, reason)
                msg = f"flame embed: shard {name} failed: {reason} (skipped; the other shards go on)"
                (bar.write if bar is not None else print)(msg, file=sys.stderr)
                log.debug("shard %s failed", name, exc_info=True)
                unexpected = 0 if isinstance(e, ShardError | NonFiniteShard) else unexpected + 1
                if unexpected >= MAX_UNEXPECTED_IN_A_ROW:
                    raise FlameError(
                        f"{unexpected} shards in a row failed with unexpected errors (last: {reason}); stopping: "
                        "this looks like a problem of the setup or a bug, not of one shard's data "
                        "(--debug shows the traceback)"
                    ) from e
                continue
            store.clear_attempt(name)
            unexpected = 0
            stats.samples += len(keys)
            stats.done += 1
        stats.truncated = sum(e.truncated - t for e, t in zip(encoders, truncated0))
        if bar is not None:
            bar.close()
        everyone = distributed.all_gather_object(stats)
        distributed.leave_together()  # every rank is here: no send left in flight at exit
    finally:
        for lock in held:
            lock.release()
    if not distributed.is_main():
        # rank 0 reports the whole job and exits non-zero if anything failed; exiting 0 here
        # keeps torchrun from stopping rank 0 before it has printed
        return 0
    total = Stats()
    for s in everyone:
        for f in ("samples", "done", "truncated", "missing", "empty", "bytes", "captions", "repeats", "tokens"):
            setattr(total, f, getattr(total, f) + getattr(s, f))
        total.failed += s.failed
    elapsed = time.perf_counter() - t0
    print(
        f"flame embed: {total.samples:,} samples, shards {total.done} done / {skipped} skipped / "
        f"{len(total.failed)} failed, {total.truncated:,} truncated captions, {total.missing:,} samples "
        f"missing a caption ({args.on_missing}), {total.empty:,} empty captions ({args.on_empty}), "
        f"{total.repeats:,} repeated captions reused, {human_bytes(total.bytes)} written to {cfg.out} "
        f"in {human_time(elapsed)}"
    )
    if total.failed:
        names = ", ".join(f"{n} ({r})" for n, r in total.failed[:3]) + (" ..." if len(total.failed) > 3 else "")
        raise FlameError(
            f"{len(total.failed)} shard{'s' if len(total.failed) > 1 else ''} failed: {names}; "
            "the other shards are complete, rerun the same command to retry (failed shards go last)"
        )
    if total.done and not total.samples and len(EmbeddingStore(cfg.out)) == 0:  # a store with no sample at all
        raise FlameError(
            f"no samples were stored: the {total.done} shard{'s' if total.done > 1 else ''} done hold none "
            f"({total.missing:,} samples missing a caption, {total.empty:,} empty captions with --on-empty "
            f"{args.on_empty}); check --data, --captions and --prompts"
        )
    return 0


# ---- dry run ------------------------------------------------------------------------------
def _dry_run(args, cfg: Config) -> int:
    import torch

    t0 = time.perf_counter()
    tables = _load_tables(args, cfg)
    stats = Stats()
    # count every problem instead of stopping at the first one
    args = argparse.Namespace(
        **{**vars(args), "on_missing": "skip", "on_empty": "skip" if args.on_empty == "skip" else "embed"}
    )
    rows, unique = 0, [0] * len(cfg.sources)
    key_bytes = 0
    sample_caps: list[list[str]] = [[] for _ in cfg.sources]
    for path in cfg.shards:
        name = shard_name(path)
        try:
            keys, captions = _shard_rows(name, path, cfg, tables, args, stats)
        except ShardError as e:
            stats.failed.append((name, str(e)))
            print(f"flame embed: shard {name} would fail: {e}", file=sys.stderr)
            continue
        rows += len(keys)
        key_bytes += len(json.dumps(keys, ensure_ascii=False)) + 1
        for i, caps in enumerate(captions):
            u = list(dict.fromkeys(clean_caption(c) for c in caps))
            unique[i] += len(u)
            sample_caps[i].extend(u[: 32 - len(sample_caps[i])])
    device = str(distributed.resolve_device(args.device))
    model, encoders, fingerprint = _load_encoders(args, cfg, device)
    from flame.llm import legacy_llm_fingerprint

    manifest = _accept_legacy_fingerprint(
        _manifest(args, cfg, encoders, fingerprint), cfg.out, legacy_llm_fingerprint(model)
    )
    k, dim = manifest["k"], manifest["dim"]
    per_row = k * dim * np.dtype(DTYPES[args.dtype]).itemsize + (4 * k if args.dtype == "int8" else 0)
    size = rows * per_row + key_bytes + 128 * 2 * len(cfg.shards)
    seconds = 0.0
    for enc, caps, n in zip(encoders, sample_caps, unique):
        if not caps:
            continue
        enc.encode(caps[:2])  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        enc.encode(caps)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += (time.perf_counter() - t) / len(caps) * n
    existing = ""
    if (cfg.out / "manifest.json").is_file():
        from flame.store import manifest_difference

        store = EmbeddingStore(cfg.out)
        diff = manifest_difference(store.manifest, manifest)
        done = sum(store.is_complete(shard_name(p)) for p in cfg.shards)
        existing = (
            f"; existing store: {done} of {len(cfg.shards)} shards complete (would be skipped)"
            if diff is None
            else f"; existing store has different settings ({diff}): needs --overwrite"
        )
    print(
        f"flame embed --dry-run: {len(cfg.shards)} shards, {rows:,} samples to store "
        f"({stats.missing:,} missing a caption, {stats.empty:,} empty captions, "
        f"{len(stats.failed)} unreadable shards), {k} facets x {dim} dims {args.dtype}"
    )
    print(f"  projected store size: {human_bytes(size)} ({per_row:,} bytes per sample){existing}")
    print(
        f"  projected time on {device}: {human_time(seconds)} for {sum(unique):,} unique captions "
        f"(timed on {sum(map(len, sample_caps))} captions; N processes/GPUs divide it by about N); "
        f"dry run took {human_time(time.perf_counter() - t0)}"
    )
    return 0


# ---- several local devices from one process -----------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(index: int, args: argparse.Namespace, devices: list[str], port: int) -> None:
    os.environ.update(
        RANK=str(index),
        LOCAL_RANK=str(index),
        WORLD_SIZE=str(len(devices)),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    args.device, args.devices = devices[index], None
    try:
        code = run(args)
    except FlameError as e:
        print(f"flame embed: error: {e}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)


def _spawn(args: argparse.Namespace, devices: list[str]) -> int:
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_spawned, args=(args, devices, _free_port()), nprocs=len(devices), start_method="spawn")
    except mp.ProcessExitedException as e:
        return int(e.exit_code or 1)
    return 0


# ---- command ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flame.llm import DEFAULT_LLM

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    g = parser.add_argument_group("inputs")
    g.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="SHARDS",
        help="webdataset tar shards: brace pattern ('cc3m/{00000..00575}.tar'), glob, folder or list",
    )
    g.add_argument(
        "--captions",
        nargs="+",
        default=[],
        metavar="[NAME=]FILE",
        help="caption tables keyed by __key__ (.json list, .jsonl, .csv, .parquet); NAME defaults to the file's stem",
    )
    g.add_argument(
        "--prompts",
        nargs="+",
        default=["raw=txt"],
        metavar="SET=SOURCE",
        help="prompt set -> caption source, e.g. raw=txt short=recap:short long=recap:long "
        "(default: raw=txt); see below",
    )
    g.add_argument("--key-field", default="__key__", help="key field of the caption tables (default: __key__)")
    g.add_argument(
        "--on-missing",
        choices=("skip", "error"),
        default="skip",
        help="a sample without a caption for some set: leave it out and count it (default) or stop",
    )
    g.add_argument(
        "--on-empty",
        choices=("embed", "skip", "error"),
        default="embed",
        help="an empty caption: embed it as empty text and count it (default), leave the sample out, or stop",
    )
    g = parser.add_argument_group("model")
    g.add_argument(
        "--llm",
        default=DEFAULT_LLM,
        help=f"hub id, local model folder, .gguf file or built-in name (default: {DEFAULT_LLM})",
    )
    g.add_argument(
        "--layer",
        default="-2",
        help="decoder block(s) whose output is the embedding, 1-based, negative from the top; "
        "a comma list averages several (default: -2, the paper's 39 of 40)",
    )
    g.add_argument(
        "--positions",
        choices=("restart", "continue"),
        default="restart",
        help="facet position ids: restart (exact = separate passes, default) or continue (the released FLAME code)",
    )
    g.add_argument(
        "--llm-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="LLM weights/compute dtype (default: bf16 on GPU, fp32 on CPU)",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if present)")
    g.add_argument(
        "--devices",
        default=None,
        metavar="LIST",
        help="comma list of local devices (cuda:0,cuda:1): one worker per device from one command",
    )
    g.add_argument(
        "--batch-tokens", type=int, default=None, help="padded tokens per forward batch (default: 4096 CPU, 65536 GPU)"
    )
    g.add_argument("--max-batch", type=int, default=64, help="sequences per forward batch at most (default 64)")
    g.add_argument(
        "--max-caption-tokens",
        type=int,
        default=DEFAULT_MAX_CAPTION_TOKENS,
        metavar="N",
        help=f"longer captions are cut to N tokens and counted as truncated (default {DEFAULT_MAX_CAPTION_TOKENS})",
    )
    g.add_argument(
        "--chunk",
        type=int,
        default=1024,
        help="unique captions handed to the encoder at once (bounds memory; default 1024)",
    )
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path, metavar="STORE", help="the embedding store folder")
    g.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="fp16",
        help="stored dtype: fp16 (default) or int8 with one float32 scale per vector",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store made with other settings (deletes its shards)",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="count samples, project the store size and the time on this hardware; write nothing",
    )
    from flame.release import LAYOUTS

    g = parser.add_argument_group("FLAME release import (instead of running an LLM)")
    g.add_argument(
        "--import-release",
        metavar="ROOT",
        default=None,
        help="copy the release's per-image embedding files ROOT/DIR/KEY.pth (11 x 5120 fp16) for the samples "
        "of --data into the store, bit-exact in fp16; no LLM is loaded",
    )
    g.add_argument(
        "--release-layout",
        choices=("auto", *LAYOUTS),
        default="auto",
        help="folder of a key's file: cc3m = the key's first 5 characters, yfcc15m = the key up to its first '_', "
        "auto = whichever exists (default)",
    )


def _import_release(args: argparse.Namespace) -> int:
    from flame.release import ImportJob, run_import

    if int(os.environ.get("RANK", "0")) != 0:  # file copying: one process does it all
        return 0
    if args.prompts != ["raw=txt"] or args.captions:
        raise FlameError("--import-release reads the release's stored vectors: --prompts/--captions do not apply")
    if args.dry_run:
        raise FlameError("--dry-run is not supported with --import-release")
    shards, out = input_shards_and_out(args)
    job = ImportJob(Path(args.import_release), shards, out, layout=args.release_layout, dtype=args.dtype,
                    on_missing=args.on_missing, overwrite=args.overwrite)
    return run_import(job, notify=_note)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "import_release", None):  # the release's stored vectors: no LLM runs
        return _import_release(args)
    under_launcher = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = _config(args)
    except FlameError:
        if rank != 0:  # every rank sees the same bad input; rank 0 says it once and exits 2
            return 0
        raise
    if args.dry_run:
        return _dry_run(args, cfg) if rank == 0 else 0
    devices = [d.strip() for d in (args.devices or "").split(",") if d.strip()]
    if len(devices) > 1 and not under_launcher:
        return _spawn(args, devices)
    if len(devices) == 1:
        args.device = devices[0]
    logging.getLogger("flame.facets").setLevel(logging.ERROR)  # truncations go to the summary
    # long timeout: ranks wait for each other only at the start and at the end
    device = distributed.init(args.device, timeout=timedelta(days=7))
    try:
        return _embed(args, cfg, str(device))
    except _PeerFailed:  # rank 0 printed the error and exits 2
        return 0
    except FlameError:
        if not distributed.is_main():
            raise FlameError(f"rank {distributed.rank()}: {sys.exc_info()[1]}") from None
        raise
    finally:
        distributed.shutdown()
