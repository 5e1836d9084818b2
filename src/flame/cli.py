"""The `flame` command: the only module that knows argparse.

Each sub-command is a stage module named in `COMMANDS`. A module with one action exposes
`Config` (a dataclass of `flame.config.setting` fields) and `main(cfg) -> int`; a module with
several (`flame search index|query`, `flame bench facets|gpu|store|train`) exposes
`ACTIONS = {name: (Config, main, help)}`. Optional `DESCRIPTION` and `EPILOG` strings fill the
help page. Every flag, its "(default ...)" text and `--config FILE` are generated here from the
dataclass; a `FlameError` becomes one line and exit 2 (a traceback only with `--debug`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys

from flame import __version__
from flame import config as settings
from flame.errors import FlameError

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "embed": ("flame.embed", "captions (webdataset shards, caption tables) -> facet embedding store"),
    "train": ("flame.train", "image shards + embedding store -> run folder with checkpoints"),
    "eval": ("flame.evaluate.cli", "zero-shot classification, retrieval, linear probe (CLIP_benchmark metrics)"),
    "bench": ("flame.benchmarks", "performance figures (facets, gpu, store, train); --json FILE saves them"),
    "convert": ("flame.convert", "the FLAME release's open_clip checkpoint -> a FlameModel folder"),
    "push": ("flame.push", "a run or model folder -> a Hugging Face Hub repo, with a generated model card"),
    "search": ("flame.search", "index a photo folder with a trained model, query it with text, HTML contact sheet"),
    "study": ("flame.study", "FLAME's claims measured on generated scenes (data efficiency, long captions, facets)"),
    "demo": ("flame.demo", "generated scenes -> embed -> train -> eval, FLAME beside a CLIP baseline, with a report"),
}
S = argparse.SUPPRESS


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors (unknown flag, missing value) also end as one line and exit 2."""

    def error(self, message: str):
        raise FlameError(f"{message} (see {self.prog} --help)")


class _Extend(argparse.Action):
    """A `repeat` list flag given twice adds to the list (`--data a --data b`), as one given once with both."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, S)
        setattr(namespace, self.dest, (list(current) if isinstance(current, list) else []) + list(values))


def _bool_type(s: str) -> bool:
    try:
        return settings.parse_bool(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _help(f: dataclasses.Field) -> str:
    text, shown = f.metadata.get("help", ""), settings.shown_default(f)
    return f"{text} (default {shown})" if shown and "(default" not in text else text


def add_field(parser, f: dataclasses.Field, hint) -> None:
    """One dataclass field as one argparse option (values stay text: `flame.config` converts)."""
    meta = f.metadata
    kw: dict = dict(default=S, help=_help(f), dest=f.name)
    if meta.get("metavar") is not None:
        kw["metavar"] = meta["metavar"]
    if meta.get("choices"):
        kw["choices"] = meta["choices"]
    base = _unoptional(hint)
    origin = getattr(base, "__origin__", None)
    if meta.get("positional"):
        kw.pop("dest")
        parser.add_argument(f.name, nargs="+" if origin is list else None, **kw)
        return
    names = [settings.flag_of(f), *meta.get("aliases", ())]
    if base is bool and meta.get("negate"):
        parser.add_argument(meta["negate"], action="store_false", **kw)
        if meta.get("optional_value") is settings.MISSING:
            return
    if base is bool:
        if meta.get("optional_value") is not settings.MISSING:
            parser.add_argument(*names, type=_bool_type, nargs="?", const=True, **kw)
        elif not meta.get("negate"):
            parser.add_argument(*names, action="store_true", **kw)
        return
    if origin is list:
        kw["nargs"] = "+"
        if meta.get("repeat"):
            kw["action"] = _Extend
    elif origin is tuple:
        kw["nargs"] = len(base.__args__)
    elif meta.get("optional_value") is not settings.MISSING:
        kw.update(nargs="?", const=meta["optional_value"])
    parser.add_argument(*names, **kw)



def _unoptional(hint):
    args = getattr(hint, "__args__", ())
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return hint


def add_config(parser: argparse.ArgumentParser, cls) -> None:
    """Every field of `cls` as a flag (grouped as declared), plus `--config FILE`."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = settings.hints(cls)
    for f in settings.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        name = f.metadata.get("group", "options")
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        add_field(groups[name], f, hints[f.name])
    parser.add_argument("--config", default=S, metavar="FILE",
                        help="YAML file of settings (keys: the flag names, - or _); flags given override it")


def config_from_args(cls, args: argparse.Namespace):
    """Field defaults < --config FILE < the flags given, converted and range-checked. A class
    whose `--config` meant something else before (flame convert's release config) names that
    field in CONFIG_ALIAS: a value that is not a .yaml/.yml file goes there."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "config", "action")}
    config_file = getattr(args, "config", None)
    alias = getattr(cls, "CONFIG_ALIAS", None)
    if alias and config_file and not str(config_file).lower().endswith((".yaml", ".yml")):
        given.setdefault(alias, config_file)
        config_file = None
    return settings.build(cls, given, config_file)


def _settings_once(cls, args: argparse.Namespace):
    """The checked settings, or None on a rank other than 0 of a torchrun job whose settings are
    wrong: every rank finds the same mistake, rank 0 prints it once and exits 2 (the others exit
    0 so torchrun does not stop rank 0 before it has printed)."""
    try:
        return config_from_args(cls, args)
    except FlameError:
        from flame.distributed import launch_rank  # torch: only paid on this error path

        if launch_rank() != 0:
            return None
        raise


def _describe(parser: argparse.ArgumentParser, module, help_text: str) -> None:
    parser.description = getattr(module, "DESCRIPTION", None) or help_text
    if getattr(module, "EPILOG", None):
        parser.epilog = module.EPILOG
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _add_command(sub, name: str, module_name: str, help_text: str, load: bool):
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--debug", action="store_true", default=S, help="show full tracebacks")
    if not load:  # only the chosen command pays for its imports
        return
    module = importlib.import_module(module_name)
    _describe(p, module, help_text)
    actions = getattr(module, "ACTIONS", None)
    if actions is None:
        add_config(p, module.Config)
        p.set_defaults(_run=(module.Config, module.main))
        return
    inner = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    for action, (cls, fn, action_help) in actions.items():
        q = inner.add_parser(action, help=action_help, description=getattr(cls, "DESCRIPTION", action_help))
        q.add_argument("--debug", action="store_true", default=S, help="show full tracebacks")
        add_config(q, cls)
        q.set_defaults(_run=(cls, fn))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flame",
        description="FLAME: train CLIP-style image encoders against a frozen LLM's multi-facet embeddings.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"flame {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        _add_command(sub, name, module, help_text, load=name == command)
    return parser


def _chosen_command(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def _quiet_libraries() -> None:
    """Our own progress bars and log lines say what is happening; library bars and advice
    (weight loading, tokenizer hints) would bury them and break the one-line error rule."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    command = _chosen_command(argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_libraries()
    try:
        args = build_parser(command).parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        cls, fn = args._run
        del args._run
        cfg = _settings_once(cls, args)
        if cfg is None:
            return 0
        return int(fn(cfg) or 0)
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
