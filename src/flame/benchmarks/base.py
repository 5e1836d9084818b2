"""What every `flame bench` action shares: the `--json FILE` setting and the report (a table of
figures on stdout, the same figures as JSON with `--json`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flame.config import setting
from flame.fileio import write_atomic


@dataclass
class BenchConfig:
    """The settings every benchmark has; each benchmark's Config adds its own."""

    json: Path | None = setting(None, metavar="FILE", help="also write the figures as JSON to FILE")


def format_table(title: str, figures: dict) -> str:
    width = max(len(k) for k in figures)
    lines = [f"\n{title}"]
    for key, value in figures.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)


def print_table(title: str, figures: dict) -> None:
    print(format_table(title, figures))


def write_json(path: Path, figures: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(figures, indent=2) + "\n")


def report(name: str, figures: dict, json_file: Path | None) -> int:
    """Print the figures of `flame bench NAME` and, with `--json FILE`, write them there."""
    print_table(f"flame bench {name}", figures)
    if json_file:
        write_json(json_file, figures)
        print(f"wrote {json_file}")
    return 0
