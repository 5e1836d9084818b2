"""Streaming one big JSON document item by item: a top-level array (`[{...}, {...}]`) or a
top-level object (`{"key": value, ...}`), as caption releases ship them. Memory is one read
chunk plus the item being decoded, never the whole document; each item is decoded by the
standard library's `json` (the same values, the same errors as `json.loads`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 18  # characters read at a time
MAX_ITEM = 64 << 20  # characters one item may span (what a bad or hostile file can make us hold)
_WS = " \t\n\r"
_AFTER = _WS + ",]}:"  # what may follow a complete number
_decoder = json.JSONDecoder()


class _Buffer:
    """A text file read in chunks; `pos` indexes into `text`, consumed text is dropped."""

    def __init__(self, f):
        self.f, self.text, self.pos, self.eof = f, "", 0, False

    def more(self) -> bool:
        """Read another chunk; False at the end of the file."""
        if self.eof:
            return False
        chunk = self.f.read(CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.text = self.text[self.pos :] + chunk
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise ValueError(f"expected {' or '.join(map(repr, chars))} at character {self.pos} of this chunk, "
                             f"got {c or 'the end of the file'!r}")
        self.pos += 1
        return c

    def value(self):
        """Decode the next JSON value; a value that runs to the end of what was read (a
        number, or a cut-off object) is retried with more text."""
        self.peek()
        while True:
            try:
                value, end = _decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError:
                if len(self.text) - self.pos < MAX_ITEM and self.more():
                    continue
                raise
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if (end == len(self.text) or (number and self.text[end] not in _AFTER)) and self.more():
                continue  # `12` may be the start of `123`, `1.5` of `1.5e3`
            self.pos = end
            return value


def iter_json_items(path: str | Path) -> Iterator[tuple[str | None, object]]:
    """(None, element) for each element of a top-level array, (key, value) for each member of
    a top-level object. Raises ValueError (json.JSONDecodeError for bad JSON, or a description
    of what was expected) and UnicodeDecodeError, as `json.loads` of the whole file would."""
    with open(path, encoding="utf-8") as f:
        buf = _Buffer(f)
        opening = buf.expect("[{")
        closing = "]" if opening == "[" else "}"
        if buf.peek() == closing:
            buf.pos += 1
        else:
            while True:
                if opening == "[":
                    yield None, buf.value()
                else:
                    key = buf.value()
                    if not isinstance(key, str):
                        raise ValueError("an object's member names must be strings")
                    buf.expect(":")
                    yield key, buf.value()
                if buf.expect("," + closing) == closing:
                    break
        if buf.peek():
            raise ValueError("extra data after the top-level JSON value")
