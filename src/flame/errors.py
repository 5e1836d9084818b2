"""One exception type for every problem caused by the user's input.

The CLI prints a `FlameError` as one line and exits non-zero; anything else is a bug
and keeps its traceback (with `--debug`, FlameErrors keep theirs too).
"""

from __future__ import annotations


class FlameError(Exception):
    """Bad input, bad configuration or a refused operation: the message is for the user."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), cut to
    `limit` characters: how a library's multi-line error is quoted inside one FlameError line."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return text if limit is None else text[:limit]
