"""One exception type for every problem caused by the user's input.

The CLI prints a `FlameError` as one line and exits non-zero; anything else is a bug
and keeps its traceback (with `--debug`, FlameErrors keep theirs too).
"""


class FlameError(Exception):
    """Bad input, bad configuration or a refused operation: the message is for the user."""
