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
    RUN/log.jsonl, RUN/tensorboard/
Checkpoints are written to a temporary folder and renamed, so a killed job never leaves a
half checkpoint. The frozen LLM is never loaded: only its stored embeddings are read.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from flame import distributed as dist
from flame.errors import FlameError
from flame.fileio import write_atomic

log = logging.getLogger("flame.train")

STATE = "state.pt"
TRAIN_CONFIG = "train-config.json"
# settings that may change between a run and its resume without --force
RESUME_FREE = {"out", "resume", "force", "log_every", "save_every", "keep", "tensorboard", "progress", "config"}


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
    tensorboard: bool = True
    progress: bool = True
    resume: str | None = None
    force: bool = False
    config: str | None = None

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
    g.add_argument("--keep", type=int, default=S, help="checkpoints kept (default 2; 0 keeps all)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=S)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    g.add_argument("--resume", nargs="?", const="latest", default=S, metavar="CHECKPOINT",
                   help="continue the run in --out (from RUN/latest or the named checkpoint folder)")
    g.add_argument("--force", action="store_true", default=S,
                   help="resume despite changed settings / start over in a non-empty --out")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
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
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    for key in ("betas", "crop_scale"):
        if key in values:
            values[key] = tuple(float(v) for v in values[key])
    cfg = TrainConfig(**values)
    for key in ("data", "embeddings", "out"):
        if not getattr(cfg, key):
            raise FlameError(f"--{key} is required (flag or config file)")
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


def _latest_checkpoint(run: Path) -> Path | None:
    marker = run / "latest"
    if marker.is_file():
        ckpt = run / marker.read_text().strip()
        if (ckpt / STATE).is_file():
            return ckpt
    found = sorted(
        (p for p in run.glob("checkpoint-*") if (p / STATE).is_file() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    return found[-1] if found else None


def plan(cfg: TrainConfig) -> Plan:
    from flame.data.images import check_data, eligible_facets, resolve_shards
    from flame.data.shards import shard_name
    from flame.model import FlameModel
    from flame.store import EmbeddingStore
    from flame.vision import TowerConfig, check_tower_name

    shards = resolve_shards(cfg.data)
    store = EmbeddingStore(cfg.embeddings)
    check_tower_name(cfg.tower)
    for name, lo in (("batch_size", 1), ("accum", 1), ("workers", 0), ("log_every", 1), ("save_every", 1)):
        if getattr(cfg, name) < lo:
            raise FlameError(f"--{name.replace('_', '-')} must be >= {lo}")
    if cfg.embed_dim is not None and cfg.embed_dim != store.dim:
        raise FlameError(f"store {store.path} has D={store.dim} but the model config asks for D={cfg.embed_dim}")
    if cfg.k is not None and cfg.k != store.k:
        raise FlameError(f"store {store.path} has K={store.k} facets but the model config asks for K={cfg.k}")
    if cfg.precision == "bf16" and cfg.device == "cpu":
        log.info("bf16 autocast on CPU requested")

    run = Path(cfg.out)
    resume_from = None
    if cfg.resume:
        resume_from = _latest_checkpoint(run) if cfg.resume == "latest" else Path(cfg.resume)
        if resume_from is None:
            raise FlameError(f"--resume: {run} has no complete checkpoint")
        if not (resume_from / STATE).is_file():
            raise FlameError(f"--resume: {resume_from} is not a complete checkpoint (no {STATE})")
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
            old = json.loads(saved_cfg_path.read_text())
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
    global_batch = cfg.batch_size * cfg.accum * dist.world_size()
    if cfg.steps is not None:
        if cfg.steps < 1:
            raise FlameError("--steps must be >= 1")
        steps = cfg.steps
    else:
        epochs = cfg.epochs if cfg.epochs is not None else 32.0
        if epochs <= 0:
            raise FlameError("--epochs must be > 0")
        steps = max(1, math.ceil(epochs * samples / global_batch))
    warmup = min(cfg.warmup, steps // 5) if cfg.warmup >= steps else cfg.warmup
    return Plan(cfg, check.usable, store, tower_config, eligible, m, steps, warmup, resume_from, samples)


# ----------------------------------------------------------------------------------------
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
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------
def save_checkpoint(run: Path, step: int, model, state: dict, keep: int) -> Path:
    """Rank 0 only: temp folder + rename, then update RUN/latest, then prune."""
    final = run / f"checkpoint-{step}"
    tmp = run / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    torch.save(state, tmp / STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(run / "latest", final.name + "\n")
    if keep > 0:
        old = sorted(
            (p for p in run.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
            key=lambda p: int(p.name.split("-")[-1]),
        )
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def clean_temporaries(run: Path) -> None:
    for p in run.glob(".checkpoint-*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


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
        path = run / "log.jsonl"
        if path.is_file():  # drop lines past the resumed step (they will be recomputed)
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= start_step]
            path.write_text("".join(ln + "\n" for ln in kept))
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
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    return train(cfg)


def train(cfg: TrainConfig) -> int:
    device = dist.init(cfg.device)
    try:
        return _train(cfg, device)
    except FlameError:
        if not dist.is_main():  # every rank saw the same error: rank 0 prints it once and exits 2;
            return 0  # exiting 0 here keeps torchrun from stopping rank 0 before it has printed
        raise
    finally:
        dist.shutdown()


def _train(cfg: TrainConfig, device: torch.device) -> int:
    from flame.data.images import StreamConfig, make_loader, normalize_images
    from flame.loss import MultiPositiveSigmoidLoss
    from flame.model import FlameModel, text_side

    # every rank validates; rank 0's error (if any) is what everybody reports
    error = None
    try:
        p = plan(cfg)
    except FlameError as e:
        error, p = str(e), None
    errors = dist.all_gather_object(error)
    first = next((e for e in errors if e), None)
    if first:
        raise FlameError(first)

    rank, world = dist.rank(), dist.world_size()
    main = dist.is_main()
    run_dir = Path(cfg.out)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_temporaries(run_dir)
        if not cfg.resume and cfg.force:
            for old in run_dir.glob("checkpoint-*"):
                shutil.rmtree(old, ignore_errors=True)
            (run_dir / "latest").unlink(missing_ok=True)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    model = FlameModel(p.tower_config, text_side(p.store.manifest))
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
    if p.resume_from is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(p.resume_from / "model.safetensors"), device=str(device)))
        state = torch.load(p.resume_from / STATE, map_location="cpu", weights_only=False)
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
        (run_dir / TRAIN_CONFIG).write_text(
            json.dumps({"config": cfg.comparable(), "world_size": world, "steps": p.steps}, indent=2) + "\n"
        )

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
        }

    data = iter(loader)
    ddp.train()
    t_last, step_last = time.perf_counter(), step
    loss_sum, loss_n = torch.zeros((), device=device), 0
    try:
        while step < p.steps:
            for micro in range(cfg.accum):
                try:
                    batch = next(data)
                except RuntimeError as e:
                    if "found no usable samples" in str(e):
                        raise FlameError(str(e).strip().splitlines()[-1]) from e
                    raise
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
                loss_sum = loss_sum + loss.detach().float()
                loss_n += 1
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            model.clamp_()
            step += 1
            if bar is not None:
                bar.update(global_batch)
            if step % cfg.log_every == 0 or step == p.steps:
                now = time.perf_counter()
                tot = dist.all_reduce_sum_int(
                    [sum(c["missing"] for c in counts.values()), sum(c["undecodable"] for c in counts.values()),
                     sum(c["samples"] for c in counts.values())], device)
                loss_mean = float(dist.all_reduce_mean(loss_sum / max(1, loss_n)))
                epoch = max((v[0] for v in positions.values()), default=0)
                record = {
                    "step": step, "loss": loss_mean, "lr": sched.get_last_lr()[0],
                    "logit_scale": model.logit_scale.exp().item(), "logit_bias": model.logit_bias.item(),
                    "images_per_s": (step - step_last) * global_batch / max(1e-9, now - t_last),
                    "epoch": epoch, "samples": tot[2], "skipped_missing": tot[0], "skipped_undecodable": tot[1],
                }
                logger.write(record)
                say(
                    f"step {step}/{p.steps}  loss {loss_mean:.4f}  lr {record['lr']:.2e}  "
                    f"t {record['logit_scale']:.2f}  b {record['logit_bias']:.2f}  "
                    f"{record['images_per_s']:.1f} img/s  epoch {epoch}  skipped {tot[0]} no-embedding, "
                    f"{tot[1]} undecodable"
                )
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_mean:.3f}")
                t_last, step_last, loss_sum, loss_n = now, step, torch.zeros((), device=device), 0
            if step % cfg.save_every == 0 or step == p.steps:
                state = checkpoint_state()
                if main:
                    path = save_checkpoint(run_dir, step, model, state, cfg.keep)
                    say(f"saved {path}")
                dist.barrier()
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        del data
    if main:
        print(f"done: {p.steps} steps; model in {run_dir / f'checkpoint-{p.steps}'}")
    return 0
