"""`flame train`: train the image tower against stored facet embeddings.

    flame train --data 'cc3m/{00000..00575}.tar' --embeddings STORE --out RUN
    torchrun --nproc_per_node 8 -m flame train --config recipe.yaml ...

Settings come from (later wins) the FLAME recipe defaults, `--config YAML` (keys = the
long flag names with `_`), and the flags given. Everything is validated before any
training time is spent; every user error is one `FlameError` line.

RUN layout:
    RUN/train-config.json          resolved settings (a resume must match them unless --force)
    RUN/checkpoint-STEP/           model.safetensors + config.json (FlameModel) + state.pt
    RUN/latest                     name of the newest complete checkpoint
    RUN/checkpoints.json           checkpoint names in the order they were written (pruning order)
    RUN/.lock                      flock held by the one job training in RUN
    RUN/log.jsonl, RUN/tensorboard/
Checkpoints are written to a temporary folder, fsynced and renamed, so a killed job never leaves
a half checkpoint under its final name. `state.pt` holds only tensors and plain data (loaded with
`weights_only=True`: a checkpoint from someone else cannot run code). A step whose loss or gradient
is not finite is skipped on every rank. The frozen LLM is never loaded: only its stored embeddings
are read.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import math
import os
import pickle
import random
import shutil
import socket
import time
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from flame import distributed as dist
from flame.errors import FlameError
from flame.fileio import TMP_SUFFIX, fsync_dir, replace, write_atomic

log = logging.getLogger("flame.train")

STATE = "state.pt"
CHECKPOINT_FILES = ("model.safetensors", "config.json", STATE)
TRAIN_CONFIG = "train-config.json"
LEDGER = "checkpoints.json"
LOCK = ".lock"
# settings that may change between a run and its resume without --force
RESUME_FREE = {"out", "resume", "force", "log_every", "save_every", "keep", "tensorboard", "progress", "config",
               "eval", "eval_every", "max_nonfinite"}


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)
    embeddings: str = ""
    out: str = ""
    # model
    tower: str = "vit-b-16"
    image_size: int | None = None
    embed_dim: int | None = None  # D expected from the store (default: the store's)
    k: int | None = None  # K expected from the store (default: the store's)
    proj_hidden: int | None = None  # H (default max(D, 4096))
    pool_first: bool = False
    tower_init: str | None = None
    # text side
    facets: str = "all"
    positives: int | None = None  # m (default min(6, eligible facets))
    init_logit_scale: str = "10"  # initial t (a number), or "auto": scaled to the store's spread
    # optimisation (FLAME recipe)
    batch_size: int = 384  # per rank, per micro-step
    accum: int = 1
    steps: int | None = None
    epochs: float | None = None
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup: int = 2000
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.5
    crop_scale: tuple[float, float] = (0.9, 1.0)
    # execution
    precision: str = "auto"  # auto | bf16 | fp32
    grad_checkpointing: bool | None = None  # default: on for CUDA
    workers: int = 4
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    # bookkeeping
    log_every: int = 10
    save_every: int = 1000
    keep: int = 2
    max_nonfinite: int = 20  # consecutive skipped (non-finite) steps that stop the run
    tensorboard: bool = True
    progress: bool = True
    resume: str | None = None
    force: bool = False
    config: str | None = None
    # evaluation during training (rank 0; text vectors computed before the first step)
    eval: str | None = None  # suite YAML (see flame eval --suite)
    eval_every: int = 1000

    def comparable(self) -> dict:
        d = asdict(self)
        return {k: _jsonable(v) for k, v in d.items() if k not in RESUME_FREE}


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.description = (
        "Train a FLAME image tower on webdataset image shards against an embedding store made by "
        "`flame embed` (the LLM is never loaded). Defaults follow the FLAME recipe (AdamW lr 5e-4, "
        "betas 0.9/0.95, wd 0.5, cosine with 2000 warm-up steps, m=6 positives). Launch with "
        "`torchrun --nproc_per_node N -m flame train ...` for several GPUs or machines."
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=S, metavar="SHARDS",
                   help="image shards: brace pattern, glob, folder or files (keys must match the store)")
    g.add_argument("--embeddings", default=S, metavar="STORE", help="embedding store folder from flame embed")
    g.add_argument("--out", default=S, metavar="RUN", help="run folder (checkpoints, logs)")
    g.add_argument("--config", default=S, metavar="YAML", help="YAML file of settings (keys = flag names)")
    g.add_argument("--workers", type=int, default=S, help="data-loader processes per rank (default 4)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=S, metavar=("LO", "HI"),
                   help="random resized crop area range (default 0.9 1.0)")
    g = p.add_argument_group("model")
    g.add_argument("--tower", default=S, help="vit-tiny, vit-s-16, vit-b-16 (default), vit-b-32, vit-l-14, timm:NAME")
    g.add_argument("--image-size", type=int, default=S, help="input resolution (default: the tower's)")
    g.add_argument("--embed-dim", type=int, default=S, help="expected text dim D (default: the store's)")
    g.add_argument("--k", type=int, default=S, help="expected facets per sample K (default: the store's)")
    g.add_argument("--proj-hidden", type=int, default=S, help="projector hidden size H (default max(D, 4096))")
    g.add_argument("--pool-first", type=_bool, nargs="?", const=True, default=S,
                   help="mean-pool patch tokens before the projector (cheaper; default off = FLAME)")
    g.add_argument("--tower-init", default=S, metavar="FILE", help="initialise the trunk from a local state dict")
    g.add_argument("--grad-checkpointing", type=_bool, nargs="?", const=True, default=S,
                   help="activation checkpointing in the trunk (default: on for CUDA)")
    g = p.add_argument_group("loss")
    g.add_argument("--facets", default=S,
                   help="eligible positives: all (default), prompt sets (short,long) or indices (0,2-5)")
    g.add_argument("--positives", "-m", type=int, default=S, help="positives sampled per image (default min(6, K))")
    g.add_argument("--init-logit-scale", default=S, metavar="T|auto",
                   help="initial logit scale t (default 10, the recipe); auto = 10 / sqrt(1 - c), c the mean "
                        "pairwise cosine of stored vectors, for LLMs whose embeddings crowd into a cone")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=S, help="images per rank per micro-step (default 384)")
    g.add_argument("--accum", type=int, default=S, help="gradient accumulation micro-steps (default 1)")
    g.add_argument("--steps", type=int, default=S, help="optimizer steps (or --epochs)")
    g.add_argument("--epochs", type=float, default=S, help="passes over the joined data (default 32 if no --steps)")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate (default 5e-4)")
    g.add_argument("--min-lr", type=float, default=S, help="cosine floor (default 0)")
    g.add_argument("--warmup", type=int, default=S, help="linear warm-up steps (default 2000, capped at steps/5)")
    g.add_argument("--betas", type=float, nargs=2, default=S, help="AdamW betas (default 0.9 0.95)")
    g.add_argument("--eps", type=float, default=S, help="AdamW eps (default 1e-8)")
    g.add_argument("--weight-decay", type=float, default=S, help="not on norms/biases/logit params (default 0.5)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=S,
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--device", default=S, help="auto (default), cpu, cuda")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--deterministic", action="store_true", default=S,
                   help="deterministic algorithms (bit-exact resume on CPU)")
    g = p.add_argument_group("run")
    g.add_argument("--log-every", type=int, default=S, help="steps between log lines (default 10)")
    g.add_argument("--save-every", type=int, default=S, help="steps between checkpoints (default 1000)")
    g.add_argument("--keep", type=int, default=S,
                   help="checkpoints kept, the most recently written (default 2; 0 keeps all)")
    g.add_argument("--max-nonfinite", type=int, default=S,
                   help="stop after this many consecutive steps with a non-finite loss or gradient "
                        "(each is skipped; default 20)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=S)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    g.add_argument("--eval", default=S, metavar="SUITE",
                   help="evaluate on this flame-eval suite file during training (rank 0; logged as eval/NAME/METRIC)")
    g.add_argument("--eval-every", type=int, default=S, help="steps between evaluations (default 1000; and the last)")
    g.add_argument("--resume", nargs="?", const="latest", default=S, metavar="CHECKPOINT",
                   help="continue the run in --out (from RUN/latest or the named checkpoint folder); a run "
                        "folder with no checkpoint yet starts from step 0, so requeued jobs can always pass it")
    g.add_argument("--force", action="store_true", default=S,
                   help="resume despite changed settings or data / start over in a non-empty --out "
                        "(the old checkpoints are deleted only after every setting has been checked)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe defaults < YAML file < flags, coerced to the field types and validated."""
    names = {f.name for f in fields(TrainConfig)}
    values: dict = {}
    cfg_path = getattr(args, "config", None)
    if cfg_path:
        import yaml

        path = Path(cfg_path)
        if not path.is_file():
            raise FlameError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise FlameError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(loaded, dict):
            raise FlameError(f"{path} must hold a mapping of settings")
        for key, value in loaded.items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise FlameError(f"{path}: unknown setting {key!r}")
            values[key] = value
    for key, value in vars(args).items():
        if key in names:
            values[key] = value
    return validate(TrainConfig(**values))


# ----------------------------------------------------------------------------------------
# settings: types come from the TrainConfig annotations, ranges from RULES (one place each)
# ----------------------------------------------------------------------------------------
def _at_least(lo):
    return (lambda v: v >= lo), f"must be >= {lo}"


def _is_logit_scale(v: str) -> bool:
    try:
        return v == "auto" or 1.0 <= float(v) <= 100.0
    except ValueError:
        return False


_POSITIVE = (lambda v: v > 0), "must be > 0"
RULES: dict[str, tuple[Callable, str]] = {
    "data": ((lambda v: len(v) > 0), "is required (flag or config file)"),
    "embeddings": ((lambda v: bool(v)), "is required (flag or config file)"),
    "out": ((lambda v: bool(v)), "is required (flag or config file)"),
    "image_size": _at_least(1), "embed_dim": _at_least(1), "k": _at_least(1), "proj_hidden": _at_least(1),
    "positives": _at_least(1), "batch_size": _at_least(1), "accum": _at_least(1), "steps": _at_least(1),
    "epochs": _POSITIVE, "lr": _POSITIVE, "min_lr": _at_least(0), "warmup": _at_least(0),
    "betas": ((lambda v: all(0 <= b < 1 for b in v)), "must each be in [0, 1)"),
    "eps": _POSITIVE, "weight_decay": _at_least(0),
    "crop_scale": ((lambda v: 0 < v[0] <= v[1] <= 1), "must be LO HI with 0 < LO <= HI <= 1"),
    "precision": ((lambda v: v in ("auto", "bf16", "fp32")), "must be auto, bf16 or fp32"),
    "workers": _at_least(0), "log_every": _at_least(1), "save_every": _at_least(1), "keep": _at_least(0),
    "max_nonfinite": _at_least(1), "eval_every": _at_least(1),
    "init_logit_scale": (_is_logit_scale, "must be a number in [1, 100] or auto"),
}


def _coerce(value, hint, where: str):
    """`value` (from YAML, the flags or the API) as the annotated type `hint`, or one FlameError.
    YAML reads `5e-4` as a string and `yes` as a bool: both are accepted where they make sense."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        items = [value] if origin is list and isinstance(value, str | Path) else value
        n = len(args) if origin is tuple else None
        if not isinstance(items, list | tuple) or (n is not None and len(items) != n):
            what = f"{n} values" if n else "a list"
            raise FlameError(f"{where}: expected {what}, got {value!r}")
        out = [_coerce(v, args[0], where) for v in items]
        return tuple(out) if origin is tuple else out
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str):
                return _bool(value)
        elif hint is int and not isinstance(value, bool):
            number = float(value) if isinstance(value, str | float) else value
            if isinstance(number, int) or (isinstance(number, float) and number.is_integer()):
                return int(number)
        elif hint is float and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                return number
        elif hint is str and isinstance(value, str | int | float | os.PathLike) and not isinstance(value, bool):
            return str(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        pass
    kind = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text"}.get(hint, hint)
    raise FlameError(f"{where}: expected {kind}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Coerce every setting to its field type and check its range: one clear FlameError, before
    anything is read, written or deleted."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(cfg, f.name)
        value = _coerce(value, hints[f.name], f"{flag} ({f.name})")
        setattr(cfg, f.name, value)
        check = RULES.get(f.name)
        if value is not None and check is not None and not check[0](value):
            shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            raise FlameError(f"{flag} {check[1]}" + (f" (got {shown})" if shown else ""))
    return cfg


# ----------------------------------------------------------------------------------------
# setup and validation (no training time spent before this passes)
# ----------------------------------------------------------------------------------------
@dataclass
class Plan:
    cfg: TrainConfig
    shards: list[Path]
    store: object
    tower_config: object
    eligible: list[int]
    m: int
    steps: int
    warmup: int
    resume_from: Path | None
    samples: int
    resume_state: dict | None = None  # the checkpoint's state.pt (plain data), when resuming
    data: dict = field(default_factory=dict)  # what the data order depends on (kept in every checkpoint)
    init_logit_scale: float = 10.0  # t at step 0 (resolved from "auto")


def _step_of(path: Path) -> int | None:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def is_complete(ckpt: Path) -> bool:
    return all((ckpt / name).is_file() for name in CHECKPOINT_FILES)


def read_ledger(run: Path) -> list[str]:
    """Checkpoint names in the order they were written ([] if the ledger is missing or unreadable)."""
    try:
        written = json.loads((run / LEDGER).read_text()).get("written", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in written]


def _latest_checkpoint(run: Path) -> Path | None:
    """RUN/latest if it names a complete checkpoint, else the most recently written complete one
    (the ledger), else the highest step."""
    marker = run / "latest"
    if marker.is_file():
        ckpt = run / marker.read_text().strip()
        if marker.read_text().strip() and is_complete(ckpt):
            return ckpt
    for name in reversed(read_ledger(run)):
        if is_complete(run / name):
            return run / name
    found = sorted((p for p in run.glob("checkpoint-*") if _step_of(p) is not None and is_complete(p)), key=_step_of)
    return found[-1] if found else None


def load_state(ckpt: Path) -> dict:
    """state.pt as plain data only: tensors, numbers, strings, lists, dicts. Anything else is
    refused before it is unpickled (a pickle can run code)."""
    path = ckpt / STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise FlameError(
            f"refusing to load {path}: it holds objects other than tensors and plain data, and unpickling "
            "them could run code (flame train writes none; was it made by an older version or tampered with?)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FlameError(f"cannot read {path} ({reason}); resume from another checkpoint") from None
    missing = [k for k in ("step", "optimizer", "scheduler", "rng") if not isinstance(state, dict) or k not in state]
    if missing:
        raise FlameError(f"{path} is not a flame train state (no {missing[0]!r})")
    return state


def data_signature(shards: list[Path], usable: list[Path], samples: int) -> dict:
    from flame.data.shards import shard_name

    return {"shards": sorted(shard_name(p) for p in shards), "store_shards": sorted(shard_name(p) for p in usable),
            "samples": samples}


def data_change(old: dict, new: dict) -> str | None:
    """What changed between two data signatures, in a few words (None: nothing that matters)."""
    for key, what in (("shards", "the image shards"), ("store_shards", "the store shards used by this run")):
        if key in old and list(old[key]) != list(new[key]):
            added, removed = sorted(set(new[key]) - set(old[key])), sorted(set(old[key]) - set(new[key]))
            parts = [f"{len(added)} added, e.g. {added[0]}" if added else "",
                     f"{len(removed)} removed, e.g. {removed[0]}" if removed else ""]
            return f"{what} changed ({'; '.join(p for p in parts if p)})"
    if old.get("samples") is not None and old["samples"] != new["samples"]:
        return f"the number of usable samples changed ({old['samples']} -> {new['samples']})"
    return None


def plan(cfg: TrainConfig) -> Plan:
    from flame.data.images import check_data, eligible_facets, resolve_shards
    from flame.data.shards import shard_name
    from flame.model import FlameModel
    from flame.store import EmbeddingStore
    from flame.vision import TowerConfig, check_tower_name

    shards = resolve_shards(cfg.data)
    store = EmbeddingStore(cfg.embeddings)
    check_tower_name(cfg.tower)
    if cfg.embed_dim is not None and cfg.embed_dim != store.dim:
        raise FlameError(f"store {store.path} has D={store.dim} but the model config asks for D={cfg.embed_dim}")
    if cfg.k is not None and cfg.k != store.k:
        raise FlameError(f"store {store.path} has K={store.k} facets but the model config asks for K={cfg.k}")
    if cfg.precision == "bf16" and cfg.device == "cpu":
        log.info("bf16 autocast on CPU requested")

    run = Path(cfg.out)
    resume_from, state = None, None
    if cfg.resume:
        resume_from = _latest_checkpoint(run) if cfg.resume == "latest" else Path(cfg.resume)
        if resume_from is None and any(run.glob("checkpoint-*")):
            raise FlameError(f"--resume: {run} has no complete checkpoint")
        if resume_from is None:  # a requeued job that was stopped before its first checkpoint
            log.info("--resume: %s has no checkpoint yet: starting from step 0", run)
    if resume_from is not None:
        if not is_complete(resume_from):
            raise FlameError(
                f"--resume: {resume_from} is not a complete checkpoint (needs {', '.join(CHECKPOINT_FILES)})"
            )
        saved = FlameModel.read_config(resume_from)
        text = saved.get("text", {})
        tower = saved.get("tower", {})
        if tower.get("embed_dim") != store.dim or text.get("k", store.k) != store.k:
            raise FlameError(
                f"checkpoint {resume_from} was trained for D={tower.get('embed_dim')}, K={text.get('k')} "
                f"but store {store.path} has D={store.dim}, K={store.k}"
            )
        fp_old = (text.get("llm") or {}).get("fingerprint")
        fp_new = (store.manifest.get("llm") or {}).get("fingerprint")
        if fp_old and fp_new and fp_old != fp_new and not cfg.force:
            raise FlameError(f"store {store.path} was made by a different LLM than checkpoint {resume_from}")
        saved_cfg_path = run / TRAIN_CONFIG
        if saved_cfg_path.is_file() and not cfg.force:
            try:
                old = json.loads(saved_cfg_path.read_text())
            except ValueError:
                raise FlameError(f"{saved_cfg_path} is unreadable; use --force to resume anyway") from None
            old_cfg, new_cfg = old.get("config", {}), cfg.comparable()
            diff = [k for k in sorted(set(old_cfg) | set(new_cfg)) if old_cfg.get(k) != new_cfg.get(k)]
            if old.get("world_size") != dist.world_size():
                diff.append("world_size")
            if diff:
                k = diff[0]
                was = old.get("world_size") if k == "world_size" else old_cfg.get(k)
                now = dist.world_size() if k == "world_size" else new_cfg.get(k)
                raise FlameError(
                    f"--resume: settings differ from the run in {run} ({k}: {was!r} -> {now!r}"
                    f"{f' and {len(diff) - 1} more' if len(diff) > 1 else ''}); use --force to resume anyway"
                )
        state = load_state(resume_from)
    elif run.exists() and any(run.glob("checkpoint-*")) and not cfg.force:
        raise FlameError(f"{run} already holds checkpoints; pass --resume to continue or --force to start over")

    eligible = eligible_facets(cfg.facets, store.manifest)
    m = cfg.positives if cfg.positives is not None else min(6, len(eligible))
    if not 1 <= m <= len(eligible):
        raise FlameError(f"--positives {m}: must be between 1 and the {len(eligible)} eligible facets")

    tower_config = TowerConfig(
        tower=cfg.tower,
        embed_dim=store.dim,
        proj_hidden=cfg.proj_hidden,
        pool_first=bool(cfg.pool_first),
        image_size=cfg.image_size,
    )
    if cfg.tower_init and not Path(cfg.tower_init).is_file():
        raise FlameError(f"--tower-init {cfg.tower_init} does not exist")

    check = check_data(shards, store)
    if check.missing_shards:
        log.warning(
            "%d of %d shards have no embeddings in the store and are skipped (e.g. %s)",
            len(check.missing_shards), len(shards), check.missing_shards[0],
        )
    samples = sum(int(store.array(shard_name(p)).shape[0]) for p in check.usable)
    data = data_signature(shards, check.usable, samples)
    if state is not None and not cfg.force:
        change = data_change(state.get("data") or {}, data)
        if change:
            raise FlameError(
                f"--resume: {change} since {resume_from.name} was written, so the data order would differ; "
                "use --force to resume anyway"
            )
    global_batch = cfg.batch_size * cfg.accum * dist.world_size()
    if cfg.steps is not None:
        steps = cfg.steps
    else:
        epochs = cfg.epochs if cfg.epochs is not None else 32.0
        steps = max(1, math.ceil(epochs * samples / global_batch))
        planned = (state or {}).get("schedule") or {}
        if planned.get("total") and planned.get("steps") is None and planned.get("epochs") == cfg.epochs \
                and planned["total"] != steps:  # same settings, other data size: keep the run's schedule
            log.info("--epochs %s now gives %d steps; keeping the %d steps this run was planned for "
                     "(pass --steps to change them)", epochs, steps, planned["total"])
            steps = int(planned["total"])
    warmup = min(cfg.warmup, steps // 5) if cfg.warmup >= steps else cfg.warmup
    init_t = _initial_logit_scale(cfg.init_logit_scale, store, check.usable, eligible) if state is None else 10.0
    return Plan(cfg, check.usable, store, tower_config, eligible, m, steps, warmup, resume_from, samples, state, data,
                init_t)


def _initial_logit_scale(spec: str, store, shards: list[Path], eligible: list[int],
                         sample: int = 2048) -> float:
    """t at step 0: the given number, or for "auto" one measured on up to `sample` stored vectors
    of the eligible facets: rows evenly spaced within evenly spaced shards (the same on every rank)."""
    from flame.data.shards import shard_name
    from flame.loss import anisotropic_logit_scale

    if spec != "auto":
        return float(spec)
    rows_wanted = max(1, sample // len(eligible))
    picked = shards[:: max(1, len(shards) // rows_wanted)][:rows_wanted]  # more shards than rows: one row each
    per = max(1, rows_wanted // len(picked))
    vectors = []
    for path in picked:
        n = int(store.array(shard_name(path)).shape[0])
        rows = np.unique(np.linspace(0, n - 1, min(n, per)).astype(np.int64))
        vectors.append(torch.from_numpy(store.get(shard_name(path), rows, eligible)).flatten(0, 1))
    texts = torch.cat(vectors)[:sample]
    t = anisotropic_logit_scale(texts)
    log.info("initial logit scale t = %.1f (auto, from %d stored vectors of the eligible facets)", t, len(texts))
    return t


# optimisation pieces
# ----------------------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, 1-D embeddings or logit params."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "logit_" in name or ".ln" in name or "norm" in name or name.endswith("bias")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, steps: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def rng_state() -> dict:
    """Every generator's state as plain data (lists, numbers, strings, tensors): loadable with
    torch.load(weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------
class _KeepWriteError:
    """File wrapper that keeps the OSError of a failed write: torch.save reports a full disk only
    as an opaque 'unexpected pos' RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_file(path: Path, text: str) -> None:
    """write_atomic, with a full disk as one FlameError (the old file stays as it was)."""
    try:
        write_atomic(path, text)
    except OSError as e:
        path.with_name(path.name + TMP_SUFFIX).unlink(missing_ok=True)
        raise FlameError(f"cannot write {path} ({e.strerror or e}): free some space and rerun with --resume") from None


def _write_state(path: Path, state: dict) -> None:
    with open(path, "wb") as f:
        sink = _KeepWriteError(f)
        try:
            torch.save(state, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def save_checkpoint(run: Path, step: int, model, state: dict, keep: int) -> Path:
    """Rank 0 only. The checkpoint is written into a temporary folder, fsynced and renamed (see
    flame.fileio.replace); then the ledger and RUN/latest are updated, then old ones pruned. A
    failed write (full disk) removes the temporary folder, leaves every earlier checkpoint and
    `latest` as they were, and raises one FlameError."""
    final = run / f"checkpoint-{step}"
    tmp = run / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save(tmp)
        _write_state(tmp / STATE, state)
        if final.exists():  # a resume from an older checkpoint writes this step again
            aside = run / f".checkpoint-{step}.tmp-old-{os.getpid()}"
            os.replace(final, aside)
            replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            replace(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or ["?"])[0]
        prev = _latest_checkpoint(run)
        raise FlameError(
            f"cannot write checkpoint {final} ({reason}); the earlier checkpoints are intact"
            f"{f' (latest: {prev.name})' if prev else ''}: free some space and rerun with --resume"
        ) from None
    written = [n for n in read_ledger(run) if n != final.name and (run / n).is_dir()] + [final.name]
    write_file(run / LEDGER, json.dumps({"written": written}) + "\n")
    write_file(run / "latest", final.name + "\n")
    prune(run, keep, protect={final.name})
    return final


def prune(run: Path, keep: int, protect: set[str]) -> None:
    """Keep the `keep` most recently written checkpoints (0: all). Write order, not step order:
    after a resume from an older checkpoint, the new checkpoints are the newest even where the
    abandoned ones have higher steps. Never deletes a name in `protect` (the one just written)."""
    if keep <= 0:
        return
    present = {p.name for p in run.glob("checkpoint-*") if _step_of(p) is not None}
    written = [n for n in read_ledger(run) if n in present]
    unknown = sorted(present - set(written), key=lambda n: _step_of(run / n))  # older than any in the ledger
    order = unknown + written  # oldest first
    doomed = [n for n in order[:-keep] if n not in protect]
    for name in doomed:
        delete_checkpoint(run / name)
    if doomed:
        write_file(run / LEDGER, json.dumps({"written": [n for n in written if n not in doomed]}) + "\n")
        fsync_dir(run)


def delete_checkpoint(ckpt: Path) -> None:
    """Rename to a temporary name first, then delete: a checkpoint is never visible half deleted
    (a job killed meanwhile leaves a temporary folder, removed by the next start)."""
    doomed = ckpt.with_name(f".{ckpt.name}.tmp-del-{os.getpid()}")
    try:
        os.replace(ckpt, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def clean_temporaries(run: Path) -> None:
    for p in run.glob(".checkpoint-*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# one job per run folder
# ----------------------------------------------------------------------------------------
class RunLock:
    """An exclusive flock on RUN/.lock, held by rank 0 for the whole job: a second `flame train`
    on the same folder is refused instead of deleting the first one's checkpoints and rewriting
    its log. The kernel drops the lock when the process dies (even by SIGKILL), so it never goes
    stale. Where the filesystem has no flock, the run goes on after one warning. Forked children (data
    loader workers) close their copy of the descriptor: an orphaned worker of a killed job would
    otherwise keep the lock for seconds."""

    UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.EBADF}

    def __init__(self, run: Path):
        self.run = run
        self.created = not run.exists()
        try:
            run.mkdir(parents=True, exist_ok=True)
            self.file = open(run / LOCK, "a+")  # noqa: SIM115 (held for the job)
        except OSError as e:
            raise FlameError(f"cannot use {run} as the run folder ({e.strerror or e})") from None
        self.fd: int | None = self.file.fileno()
        os.register_at_fork(after_in_child=self._close_in_child)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.fd = None
            self.file.close()
            raise FlameError(
                f"{run} is in use by another flame train ({holder}); wait for it to end or choose another --out"
            ) from None
        except OSError as e:
            if e.errno not in self.UNSUPPORTED:
                raise
            log.warning("cannot lock %s (%s: the filesystem does not support flock): make sure no other "
                        "job trains in this folder", run / LOCK, e.strerror or e)
        else:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            self.file.flush()

    def _close_in_child(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def release(self) -> None:
        self.fd = None
        self.file.close()
        if self.created and [p.name for p in self.run.iterdir()] == [LOCK]:  # nothing came of it
            (self.run / LOCK).unlink(missing_ok=True)
            try:
                self.run.rmdir()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------
class Logger:
    def __init__(self, run: Path, enabled: bool, tensorboard: bool, start_step: int):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        self.path = path = run / "log.jsonl"
        if path.is_file():  # drop lines past the resumed step (they will be recomputed)
            kept, torn = [], 0
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:
                    record, torn = None, torn + 1  # a job killed in the middle of writing it
                if isinstance(record, dict) and record.get("step", 0) <= start_step:
                    kept.append(line)
            if torn:
                log.warning("%s: dropped %d torn line(s) left by an interrupted job", path, torn)
            write_file(path, "".join(ln + "\n" for ln in kept))
        self.jsonl = path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            except Exception as e:  # tensorboard missing or broken: keep training
                log.warning("tensorboard disabled: %s", e)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        except OSError as e:
            raise FlameError(
                f"cannot write {self.path} ({e.strerror or e}); free some space and rerun with --resume"
            ) from None
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k if k.startswith("eval/") else f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except FlameError:
        if int(os.environ.get("RANK", "0") or 0) != 0:  # under torchrun every rank reads the same settings:
            return 0  # rank 0 reports them once (no process group exists yet)
        raise
    return train(cfg)


def train(cfg: TrainConfig) -> int:
    device = dist.init(cfg.device)
    try:
        return _train(cfg, device)
    except dist.AgreedError:
        dist.leave_together()
        if not dist.is_main():  # every rank raised it at the same point: rank 0 prints it once and exits 2;
            return 0  # exiting 0 here keeps torchrun from stopping rank 0 before it has printed
        raise
    except FlameError as e:  # this rank alone: it reports and exits 2, and torchrun stops the others
        if not dist.is_main():
            raise FlameError(f"rank {dist.rank()}: {e}") from e
        raise
    except torch.distributed.DistError as e:  # a peer died (its own error says why): one line, not a traceback
        if dist.world_size() == 1:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise FlameError(f"rank {dist.rank()}: lost contact with another rank ({reason})") from e
    finally:
        dist.shutdown()


def _train(cfg: TrainConfig, device: torch.device) -> int:
    # every rank validates; the first error (rank 0's if it has one) is what everybody reports
    lock, error, p = None, None, None
    try:
        validate(cfg)
        if dist.is_main():
            lock = RunLock(Path(cfg.out))
        p = plan(cfg)
    except FlameError as e:
        error = str(e)
    try:
        dist.check_errors(error)
        return _fit(cfg, p, device)
    finally:
        if lock is not None:
            lock.release()


def _error_line(e: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it with its traceback."""
    last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    name, sep, rest = last.partition(": ")
    return rest if sep and name.rsplit(".", 1)[-1] in ("FlameError", "RuntimeError") else last


def _fit(cfg: TrainConfig, p: Plan, device: torch.device) -> int:
    from flame.data.images import StreamConfig, make_loader, normalize_images
    from flame.loss import MultiPositiveSigmoidLoss
    from flame.model import FlameModel, text_side

    evaluator = None
    if cfg.eval:  # the evaluation hook: rank 0 caches the suite's text vectors now (LLM loaded and freed)
        from flame.evaluate.during import TrainEvaluator

        evaluator = TrainEvaluator.on_rank0(cfg.eval, cfg.eval_every, text_side(p.store.manifest), p.steps,
                                            device=str(device), batch_size=cfg.batch_size,
                                            workers=min(2, cfg.workers), progress=cfg.progress)

    rank, world = dist.rank(), dist.world_size()
    main = dist.is_main()
    run_dir = Path(cfg.out)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    model = FlameModel(p.tower_config, text_side(p.store.manifest))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(p.init_logit_scale))  # a resume loads the trained value over it
    if cfg.tower_init:
        info = model.visual.init_trunk_from(cfg.tower_init)
        if main:
            log.info("trunk initialised from %s (%d tensors, %d missing)", cfg.tower_init, info["loaded"],
                     len(info["missing"]))
    grad_ckpt = cfg.grad_checkpointing if cfg.grad_checkpointing is not None else device.type == "cuda"
    if grad_ckpt:
        model.set_grad_checkpointing(True)
    model.to(device)
    ddp = dist.wrap_ddp(model, device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p.warmup, p.steps, cfg.min_lr / cfg.lr))
    loss_fn = MultiPositiveSigmoidLoss()
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    step, batches = 0, 0
    positions: dict = {}
    counts: dict = {}
    if p.resume_state is not None:
        from safetensors.torch import load_file

        state = p.resume_state
        model.load_state_dict(load_file(str(p.resume_from / "model.safetensors"), device=str(device)))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        same_layout = state.get("world_size") == world and state.get("workers") == cfg.workers
        if same_layout:
            batches = int(state["batches"][rank])
            positions = {int(k): tuple(v) for k, v in state["positions"][rank].items()}
            counts = {int(k): v for k, v in state["counts"][rank].items()}
            set_rng_state(state["rng"][rank])
        else:
            epoch = max((v[0] for r in state["positions"] for v in r.values()), default=0) + 1
            positions = {w: (epoch, 0) for w in range(max(1, cfg.workers))}
            log.warning("resuming with a different world size / worker count: data restarts at epoch %d", epoch)
        if main:
            log.info("resumed from %s at step %d", p.resume_from, step)
    if main:
        clean_temporaries(run_dir)
        if p.resume_from is None and cfg.force:  # everything is validated and built: only now go the old files
            for old in run_dir.glob("checkpoint-*"):
                delete_checkpoint(old)
            for name in ("latest", LEDGER):
                (run_dir / name).unlink(missing_ok=True)
            fsync_dir(run_dir)
        write_file(run_dir / TRAIN_CONFIG, json.dumps(
            {"config": cfg.comparable(), "world_size": world, "steps": p.steps, "data": p.data}, indent=2) + "\n")

    workers = max(0, cfg.workers)
    stream = StreamConfig(
        shards=[str(s) for s in p.shards],
        store=str(p.store.path),
        image_size=model.image_size,
        batch_size=cfg.batch_size,
        m=p.m,
        eligible=p.eligible,
        seed=cfg.seed,
        crop_scale=tuple(cfg.crop_scale),
        rank=rank,
        world=world,
        positions={k: list(v) for k, v in positions.items()},
        rotate=batches % max(1, workers),
    )
    loader = make_loader(stream, workers, pin_memory=device.type == "cuda")
    global_batch = cfg.batch_size * cfg.accum * world
    if main:
        n_params = sum(q.numel() for q in model.parameters())
        log.info(
            "flame train: %s (%.1fM params, D=%d, H=%d, %s), %d shards / %d samples, m=%d of %d facets, "
            "global batch %d (%d ranks x %d x %d accum), %d steps (%d warm-up), device %s%s",
            cfg.tower, n_params / 1e6, p.store.dim, p.tower_config.hidden,
            "pool-first" if p.tower_config.pool_first else "per-token projector", len(p.shards), p.samples,
            p.m, len(p.eligible), global_batch, world, cfg.batch_size, cfg.accum, p.steps, p.warmup, device,
            " bf16" if use_bf16 else "",
        )
    logger = Logger(run_dir, main, cfg.tensorboard, step)
    bar = None
    if main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=p.steps * global_batch, initial=step * global_batch, unit="img", unit_scale=True,
                   dynamic_ncols=True, desc="train")
    say = (bar.write if bar is not None else print) if main else (lambda s: None)

    def checkpoint_state() -> dict:
        """Plain data only (see load_state); what a resume needs to continue exactly."""
        gathered = dist.all_gather_object(
            {"batches": batches, "positions": {k: list(v) for k, v in positions.items()}, "counts": counts,
             "rng": rng_state()}
        )
        return {
            "step": step,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "world_size": world,
            "workers": cfg.workers,
            "batches": [g["batches"] for g in gathered],
            "positions": [g["positions"] for g in gathered],
            "counts": [g["counts"] for g in gathered],
            "rng": [g["rng"] for g in gathered],
            "data": p.data,
            "schedule": {"steps": cfg.steps, "epochs": cfg.epochs, "total": p.steps},
        }

    def next_batch(data) -> dict:
        """The next micro-batch. A user error on this rank (e.g. its shards hold no usable sample)
        is shared with every rank before anyone enters the step's collectives, so all stop together."""
        batch, error = None, None
        try:
            batch = next(data)
        except FlameError as e:
            error = _error_line(e)
        except RuntimeError as e:
            if "found no usable samples" not in str(e):
                raise
            error = _error_line(e)
        dist.check_errors(error)
        return batch

    def finite(tensors) -> torch.Tensor:
        """One device-side flag: every element of every tensor is finite."""
        flags = [torch.isfinite(t).all() for t in tensors if t is not None]
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)

    data = iter(loader)
    ddp.train()
    t_last, step_last = time.perf_counter(), step
    loss_sum, loss_n = torch.zeros((), device=device), 0
    skipped_run = skipped_total = skipped_since_log = 0  # steps skipped for a non-finite loss or gradient
    last_saved = p.resume_from
    try:
        while step < p.steps:
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.accum):
                batch = next_batch(data)
                batches += 1
                st = batch["state"]
                positions[st["worker"]] = (st["epoch"], st["pos"])
                counts[st["worker"]] = {k: st[k] for k in ("missing", "undecodable", "samples")}
                images = normalize_images(batch["images"].to(device, non_blocking=True), model.mean, model.std)
                texts = batch["texts"].to(device, non_blocking=True).float()
                with dist.no_sync(ddp, micro < cfg.accum - 1):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        out = ddp(images)
                        loss = loss_fn(out["image"], texts, out["logit_scale"], out["logit_bias"])
                    (loss / cfg.accum).backward()
                step_loss = step_loss + loss.detach().float()
            # a NaN/inf loss or gradient on any rank: no rank steps on it (all agree through the all-reduce)
            ok = torch.isfinite(step_loss) & finite(q.grad for q in model.parameters())
            skip = bool(dist.all_reduce_max((~ok).to(torch.int32)).item())
            step += 1
            if skip:
                skipped_run, skipped_total, skipped_since_log = (n + 1 for n in (skipped_run, skipped_total,
                                                                                  skipped_since_log))
                say(f"step {step}: non-finite loss or gradient: update skipped ({skipped_run} in a row, "
                    f"{skipped_total} in all)")
                if skipped_run >= cfg.max_nonfinite:
                    kept = f"the last checkpoint, {last_saved}, has finite weights" if last_saved else "none saved"
                    raise dist.AgreedError(
                        f"{skipped_run} consecutive steps (up to step {step}) had a non-finite loss or gradient; "
                        f"stopping ({kept}). Check the data (NaN/inf rows in the store?) or lower --lr, then --resume"
                    )
                with warnings.catch_warnings():  # the schedule follows the data: it advances on a skipped step
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    sched.step()
            else:
                skipped_run = 0
                opt.step()
                sched.step()
                loss_sum, loss_n = loss_sum + step_loss, loss_n + cfg.accum
            opt.zero_grad(set_to_none=True)
            model.clamp_()
            if bar is not None:
                bar.update(global_batch)
            if step % cfg.log_every == 0 or step == p.steps or skip:
                now = time.perf_counter()
                tot = dist.all_reduce_sum_int(
                    [sum(c["missing"] for c in counts.values()), sum(c["undecodable"] for c in counts.values()),
                     sum(c["samples"] for c in counts.values())], device)
                loss_mean = float(dist.all_reduce_mean(loss_sum / loss_n)) if loss_n else None
                epoch = max((v[0] for v in positions.values()), default=0)
                record = {
                    "step": step, "loss": loss_mean, "lr": sched.get_last_lr()[0],
                    "logit_scale": model.logit_scale.exp().item(), "logit_bias": model.logit_bias.item(),
                    "images_per_s": (step - step_last) * global_batch / max(1e-9, now - t_last),
                    "epoch": epoch, "samples": tot[2], "skipped_missing": tot[0], "skipped_undecodable": tot[1],
                    "nonfinite": skipped_since_log,
                }
                logger.write(record)
                say(
                    f"step {step}/{p.steps}  loss {'n/a' if loss_mean is None else f'{loss_mean:.4f}'}  "
                    f"lr {record['lr']:.2e}  t {record['logit_scale']:.2f}  b {record['logit_bias']:.2f}  "
                    f"{record['images_per_s']:.1f} img/s  epoch {epoch}  skipped {tot[0]} no-embedding, "
                    f"{tot[1]} undecodable, {skipped_total} non-finite steps"
                )
                if bar is not None and loss_mean is not None:
                    bar.set_postfix(loss=f"{loss_mean:.3f}")
                t_last, step_last, loss_sum, loss_n = now, step, torch.zeros((), device=device), 0
                skipped_since_log = 0
            if evaluator is not None:
                evaluator.after_step(step, model, logger.write, say)
            if step % cfg.save_every == 0 or step == p.steps:
                if not bool(finite(model.parameters())):  # the same weights on every rank: all stop here
                    kept = f"the last checkpoint, {last_saved}," if last_saved else "no checkpoint"
                    raise dist.AgreedError(
                        f"the weights are not finite at step {step} (an update overflowed): not saving them; "
                        f"{kept} has finite weights. Lower --lr and --resume from it"
                    )
                state = checkpoint_state()
                error = None
                if main:
                    try:
                        say(f"saved {save_checkpoint(run_dir, step, model, state, cfg.keep)}")
                    except FlameError as e:
                        error = str(e)
                dist.check_errors(error)  # a failed save (full disk) on rank 0 stops every rank
                last_saved = run_dir / f"checkpoint-{step}"
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        del data
    dist.leave_together()
    if main:
        print(f"done: {p.steps} steps; model in {run_dir / f'checkpoint-{p.steps}'}")
    return 0
