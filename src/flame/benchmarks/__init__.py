"""`flame bench WHAT`: side-by-side performance figures. Each benchmark is a module here
exposing `add_arguments(parser)` and `run(args) -> dict`; the dict is printed as a table
and, with `--json FILE`, written to FILE."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from flame.fileio import write_atomic

BENCHMARKS: dict[str, tuple[str, str]] = {
    "facets": ("flame.benchmarks.facets", "packed facet-decoupled pass vs K separate passes"),
    "store": ("flame.benchmarks.store", "store size and random-access reads vs one .pth per sample"),
    "train": ("flame.benchmarks.train", "training-step overhead and data-loader throughput"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON to FILE")
        importlib.import_module(module).add_arguments(p)


def print_table(title: str, figures: dict) -> None:
    width = max(len(k) for k in figures)
    print(f"\n{title}")
    for key, value in figures.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {shown}")


def write_json(path: Path, figures: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(figures, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    figures = importlib.import_module(BENCHMARKS[args.bench][0]).run(args)
    print_table(f"flame bench {args.bench}", figures)
    if args.json:
        write_json(args.json, figures)
        print(f"wrote {args.json}")
    return 0
