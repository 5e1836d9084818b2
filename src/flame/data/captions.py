"""Caption readers: text members of webdataset shards (images are never read into
memory or decoded) and caption tables keyed by the webdataset `__key__`.

Table formats, chosen by file suffix: `.json` (a list of objects, as the FLAME
recaption release), `.jsonl` / `.ndjson` (one object per line), `.csv` (header row),
`.parquet`.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.tariterators import tar_file_iterator

from flame.data.shards import ShardError, member_key
from flame.errors import FlameError, first_line

__all__ = ["KEY_FIELD", "TABLE_SUFFIXES", "CaptionTable", "ShardCaptions", "ShardError", "read_shard_captions"]

TABLE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet")
KEY_FIELD = "__key__"


@dataclass
class ShardCaptions:
    keys: list[str]  # every sample key in tar order (samples with any member)
    text: dict[str, dict[str, str]] = field(default_factory=dict)  # ext -> key -> text


def read_shard_captions(path: str | Path, exts: Iterable[str]) -> ShardCaptions:
    """Keys of every sample in a webdataset tar and the text of its members with the
    given extensions (`txt`, ...). Other members (images) are skipped unread, using
    webdataset's own tar iteration and the key/extension rule of `flame.data.shards`."""
    exts = {e.lower() for e in exts}
    keys: dict[str, None] = {}
    text: dict[str, dict[str, str]] = {e: {} for e in exts}

    def select(fname: str) -> bool:
        key, ext = member_key(fname)
        if key is None:
            return False
        keys.setdefault(key)
        return ext.lower() in exts

    try:
        with open(path, "rb") as f:
            for member in tar_file_iterator(f, select_files=select):
                key, ext = member_key(member["fname"])
                table = text[ext.lower()]
                if key in table:
                    raise ShardError(f"duplicate member {member['fname']}")
                table[key] = member["data"].decode("utf-8", errors="replace")
        _check_end_marker(path)
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason = str(e).split(" @ ")[0] or e.__class__.__name__
        raise ShardError(f"unreadable tar ({reason})") from e
    return ShardCaptions(list(keys), text)


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


def _check_end_marker(path: str | Path) -> None:
    """tarfile's stream reader stops quietly when a plain tar is cut short; every tar
    writer ends the archive with two zero blocks, so a missing marker means truncation.
    (Compressed tars carry a checksum that the reader already verifies.)"""
    with open(path, "rb") as f:
        head = f.read(6)
        if head.startswith(_COMPRESSED):
            return
        size = f.seek(0, 2)
        f.seek(max(size - 1024, 0))
        tail = f.read(1024)
    if len(tail) < 1024 or tail.strip(b"\0"):
        raise ShardError("unreadable tar (truncated: no end-of-archive marker)")


class CaptionTable:
    """A table of captions keyed by `__key__` (or another key field). Only the columns
    asked for are kept, as plain dicts key -> text."""

    def __init__(self, path: str | Path, key_field: str = KEY_FIELD):
        self.path = Path(path)
        self.key_field = key_field
        if not self.path.is_file():
            raise FlameError(f"caption table not found: {self.path}")
        if self.path.suffix.lower() not in TABLE_SUFFIXES:
            raise FlameError(
                f"caption table {self.path}: unknown format {self.path.suffix!r} (use {', '.join(TABLE_SUFFIXES)})"
            )
        self._columns: dict[str, dict[str, str | None]] = {}
        self.duplicates = 0

    def column(self, name: str) -> dict[str, str | None]:
        """key -> caption (None where the table holds a null)."""
        self.load([name])
        return self._columns[name]

    def load(self, names: Iterable[str], keys: set[str] | None = None) -> None:
        """Read the columns `names`, keeping only the rows whose key is in `keys` (all if None).
        JSONL, CSV and Parquet are streamed, so memory follows the rows kept."""
        todo = [n for n in dict.fromkeys(names) if n not in self._columns]
        if todo:
            self._columns.update(self._load(todo, keys))

    # ---- readers ----------------------------------------------------------------------
    def _rows(self, names: list[str], keys: set[str] | None) -> tuple[list[str], Iterable[tuple]]:
        """(available column names, iterator of tuples (key, *names))."""
        suffix = self.path.suffix.lower()
        if suffix == ".parquet":
            return self._parquet_rows(names)
        if suffix == ".csv":
            return self._csv_rows(names)
        kf = self.key_field
        if suffix == ".json":
            records = self._json_records([kf, *names], keys)
        else:
            records = self._jsonl_records([kf, *names], keys)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise FlameError(f"caption table {self.path}: expected a list of objects with {kf!r} and caption fields")
        header = list(dict.fromkeys(k for r in records[:1000] for k in r))
        for n in [kf, *names]:
            if n not in header and any(n in r for r in records):
                header.append(n)
        return header, ((r.get(kf), *(r.get(n) for n in names)) for r in records)

    def _parquet_rows(self, names: list[str]) -> tuple[list[str], Iterable[tuple]]:
        import pyarrow.parquet as pq

        kf = self.key_field
        try:
            schema = pq.read_schema(self.path)
            cols = [n for n in [kf, *names] if n in schema.names]
            if kf not in cols or len(cols) < len(names) + 1:
                return list(schema.names), iter(())
            parquet = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises many types for a bad file
            raise FlameError(f"caption table {self.path}: cannot read Parquet ({first_line(e)})") from e

        def batches():
            for batch in parquet.iter_batches(columns=[kf, *names], batch_size=65536):
                yield from zip(*(batch.column(c).to_pylist() for c in [kf, *names]))

        return list(schema.names), batches()

    def _csv_rows(self, names: list[str]) -> tuple[list[str], Iterable[tuple]]:
        kf = self.key_field
        with open(self.path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])

        def csv_rows():
            try:
                with open(self.path, newline="", encoding="utf-8") as f:
                    for row in csv.DictReader(f):
                        yield (row.get(kf), *(row.get(n) for n in names))
            except (csv.Error, UnicodeDecodeError) as e:
                raise FlameError(f"caption table {self.path}: cannot read CSV ({e})") from e

        return header, csv_rows()

    def _json_records(self, fields: list[str], keys: set[str] | None) -> list[dict]:
        """Stream a `.json` table (a list of objects, or {key: caption} / {key: {...}}) item by
        item (`flame.data.jsonstream`), keeping only `fields` of the wanted rows: memory follows
        the rows kept, as for JSONL. The first row carries every field of the first 1000 rows
        (None where absent) and every wanted field seen anywhere, for the header check."""
        from flame.data.jsonstream import iter_json_items

        kf, seen, kept, first_fields = fields[0], set(), [], {}
        try:
            for n, (key, value) in enumerate(iter_json_items(self.path)):
                if key is None and not isinstance(value, dict):
                    raise FlameError(f"caption table {self.path}: expected a list of objects with {kf!r} and "
                                     "caption fields")
                row = value if key is None else {kf: key, **(value if isinstance(value, dict) else {"caption": value})}
                if n < 1000:
                    first_fields.update(dict.fromkeys(row))
                seen.update(f for f in fields if f in row)
                if keys is None or str(row.get(kf)) in keys:
                    kept.append({f: row[f] for f in fields if f in row})
        except (ValueError, UnicodeDecodeError) as e:
            raise FlameError(f"caption table {self.path}: invalid JSON ({e.__class__.__name__}: {e})") from e
        header_row = dict.fromkeys(first_fields) | dict.fromkeys(sorted(seen - set(first_fields)))
        return [header_row | kept[0], *kept[1:]] if kept else ([header_row] if header_row else [])

    def _jsonl_records(self, fields: list[str], keys: set[str] | None) -> list[dict]:
        """Stream a JSONL file, keeping only `fields` of the rows whose key is wanted, so memory
        follows the rows kept, not the file. Every field seen anywhere appears in the first
        row (None if absent there) so the header check sees it."""
        kf, seen, kept = fields[0], set(), []
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise FlameError(f"caption table {self.path}: expected one JSON object per line")
                    seen.update(n for n in fields if n in row)
                    if keys is None or str(row.get(kf)) in keys:
                        kept.append({n: row[n] for n in fields if n in row})
        except (ValueError, UnicodeDecodeError) as e:
            raise FlameError(f"caption table {self.path}: invalid JSON ({e.__class__.__name__}: {e})") from e
        header_row = dict.fromkeys(seen)
        return [header_row | kept[0], *kept[1:]] if kept else ([header_row] if seen else [])

    def _load(self, names: list[str], keys: set[str] | None = None) -> dict[str, dict[str, str | None]]:
        header, rows = self._rows(names, keys)
        if self.key_field not in header:
            raise FlameError(
                f"caption table {self.path} has no key field {self.key_field!r} "
                f"(fields: {', '.join(header[:12]) or 'none'}); set --key-field"
            )
        for n in names:
            if n not in header:
                raise FlameError(f"caption table {self.path} has no column {n!r} (columns: {', '.join(header[:12])})")
        out: dict[str, dict[str, str | None]] = {n: {} for n in names}
        for key, *values in rows:
            if key is None:
                continue
            key = str(key)
            if keys is not None and key not in keys:
                continue
            first = out[names[0]]
            if key in first:
                self.duplicates += 1  # the first occurrence wins
                continue
            for n, v in zip(names, values):
                out[n][key] = None if v is None else str(v)
        return out
