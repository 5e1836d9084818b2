"""The `flame` command: one sub-command per pipeline stage plus `bench`.

Each sub-command lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; this file only wires them up and turns `FlameError` into one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from flame.errors import FlameError

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "embed": ("flame.embed", "captions (webdataset shards, caption tables) -> facet embedding store"),
    "train": ("flame.train", "image shards + embedding store -> run folder with checkpoints"),
    "eval": ("flame.evaluate.cli", "zero-shot classification, retrieval, linear probe (CLIP_benchmark metrics)"),
    "bench": ("flame.benchmarks", "performance figures (facets, store, train); --json FILE saves them"),
    "convert": ("flame.convert", "the FLAME release's open_clip checkpoint -> a FlameModel folder"),
    "search": ("flame.search", "index a photo folder with a trained model, query it with text, HTML contact sheet"),
    "demo": ("flame.demo", "generated scenes -> embed -> train -> eval, FLAME beside a CLIP baseline, with a report"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flame",
        description="FLAME: train CLIP-style image encoders against a frozen LLM's multi-facet embeddings.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        if name == command:  # only the chosen command pays for its imports
            importlib.import_module(module).add_arguments(p)
    return parser


def _chosen_command(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def _quiet_libraries() -> None:
    """Our own progress bars and log lines say what is happening; library bars and advice
    (weight loading, tokenizer hints) would bury them and break the one-line error rule."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen_command(argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_libraries()
    try:
        args = build_parser(command).parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except FlameError as e:
        if debug:
            raise
        print(f"flame {command or ''}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flame: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
