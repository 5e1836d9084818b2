"""Run `flame ...` in-process and read what a user would see: the exit code, stdout, and the
error line (exactly one, never a traceback)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from flame.cli import main

PROGRESS = re.compile(r"^\[[^\]]+\] [\d,.]+(/[\d,.]+)? ")  # a `flame.progress` status line without a terminal

# two local processes, rendezvous on a free port: append a script and its arguments, or `-m flame ...`
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", "localhost:0"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        """Non-empty stderr lines, progress (tqdm bars, `flame.progress` status lines) left out; a
        traceback fails the test."""
        assert "Traceback" not in self.err, self.err
        return [ln for ln in self.err.splitlines() if ln.strip() and "%|" not in ln and not PROGRESS.match(ln)]

    @property
    def error(self) -> str:
        """The one stderr line of a refused command."""
        lines = self.lines
        assert len(lines) == 1, self.err
        return lines[0]

    def __iter__(self):  # `code, out, err = run(...)`
        return iter((self.code, self.out, self.err))

    def __getitem__(self, i: int):  # `run(...)[0]`
        return (self.code, self.out, self.err)[i]


def run_flame(capsys, *argv) -> Result:
    """`flame ARGV...` with its output captured (anything printed before is discarded)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return Result(code, out, err)


def one_line(err: str) -> str:
    """The one non-empty stderr line (asserts there is exactly one and no traceback)."""
    return Result(2, "", err).error


def lines_of(err: str) -> list[str]:
    """Non-empty stderr lines, progress bars left out (asserts there is no traceback)."""
    return Result(2, "", err).lines
