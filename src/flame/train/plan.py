"""What a run will do, worked out and checked before any training time is spent.

`plan(cfg)` reads the shards and the store, checks a resume against its checkpoint, its saved
settings and its data, and resolves every derived default (m, the step count, the warm-up,
the initial logit scale; the device-dependent one is `use_bf16`).
Each check is its own small function and raises one FlameError line.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flame import distributed as dist
from flame.errors import FlameError
from flame.runfolder import CHECKPOINT_FILES, TRAIN_CONFIG, is_complete, latest_checkpoint
from flame.train.checkpoint import load_state
from flame.train.config import DEFAULT_EPOCHS, DEFAULT_POSITIVES, TrainConfig

log = logging.getLogger("flame.train")


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
    mix: list[dict] | None = None  # the resampled stream's sources: [{"shards": [paths], "weight": w}] (mix_plan)
    report_to: tuple[str, ...] = ("jsonl", "tensorboard")  # the log's destinations (logger.destinations)


def plan(cfg: TrainConfig) -> Plan:
    from flame.data.images import eligible_facets
    from flame.store import EmbeddingStore
    from flame.train.logger import destinations
    from flame.vision import TowerConfig, check_tower_name

    report_to = destinations(cfg.report_to, cfg.tensorboard)
    sources, shards = source_shards(cfg.data)
    store = EmbeddingStore(cfg.embeddings)
    check_tower_name(cfg.tower)
    check_store(cfg, store)
    run = Path(cfg.out)
    resume_from, state = find_resume(cfg, run), None
    if resume_from is not None:
        check_checkpoint(cfg, resume_from, store)
        check_settings(cfg, run)
        state = load_state(resume_from)
    elif run.exists() and any(run.glob("checkpoint-*")) and not cfg.force:
        raise FlameError(f"{run} already holds checkpoints; pass --resume to continue or --force to start over")
    eligible = eligible_facets(cfg.facets, store.manifest)
    m = positives(cfg, eligible)
    tower_config = TowerConfig(tower=cfg.tower, embed_dim=store.dim, proj_hidden=cfg.proj_hidden,
                               pool_first=bool(cfg.pool_first), image_size=cfg.image_size)
    if cfg.tower_init and resume_from is None:  # found locally now (its keys are checked when the tower is built)
        from flame.towerinit import resolve

        resolve(cfg.tower_init, cfg.tower)
    usable, samples, data = usable_data(shards, store)
    mix = mix_plan(cfg, sources, usable, store)
    if mix is None:
        warn_few_shards(len(usable), max(1, cfg.workers) * dist.world_size())
    if mix is not None:
        data["mix"] = [{"shards": sorted(shard_names(s["shards"])), "weight": s["weight"]} for s in mix]
    if state is not None and not cfg.force:
        check_same_data(state, data, resume_from)
    steps = total_steps(cfg, cfg.train_num_samples or samples, state)
    init_t = initial_logit_scale(cfg.init_logit_scale, store, usable, eligible) if state is None else 10.0
    return Plan(cfg, usable, store, tower_config, eligible, m, steps, warmup_steps(cfg.warmup, steps), resume_from,
                samples, state, data, init_t, mix, report_to)


# -- the data: sources and their mix ---------------------------------------------------------
def source_shards(specs) -> tuple[list[tuple[object, list[Path]]], list[Path]]:
    """(each --data source (flame.data.mix.Source: spec and weight) with its shard files, all the
    shards). Without weights the specs are resolved together, as one list (every shard once)."""
    from flame.data.images import resolve_shards
    from flame.data.mix import parse_sources, weighted

    sources = parse_sources(specs)
    if not weighted(sources):
        return [(s, []) for s in sources], resolve_shards([s.spec for s in sources])
    found = [(source, resolve_shards(source.spec)) for source in sources]
    return found, list(dict.fromkeys(p for _, paths in found for p in paths))


def shard_names(paths) -> list[str]:
    from flame.data.shards import shard_name

    return [shard_name(Path(p)) for p in paths]


def mix_plan(cfg: TrainConfig, sources, usable: list[Path], store) -> list[dict] | None:
    """The resampled stream's sources (None: the epoch stream). --resampled defaults to on when a
    --data has a ::WEIGHT; without any weight all the data is one source. Each source keeps its
    shards that have embeddings (at least one), and no shard may be in two weighted sources."""
    from flame.data.mix import weighted

    if cfg.resampled is False and weighted([s for s, _ in sources]):
        raise FlameError("--data ::WEIGHT needs the resampled stream: drop --resampled false")
    if not (cfg.resampled or weighted([s for s, _ in sources])):
        return None
    if not weighted([s for s, _ in sources]):
        return [{"shards": sorted(str(p) for p in usable), "weight": 1.0}]
    have, owner, mix = set(usable), {}, []
    for source, found in sources:
        for p in found:
            if owner.setdefault(p, source.spec) != source.spec:
                raise FlameError(f"shard {p.name} is in two --data sources ({owner[p]} and {source.spec})")
        kept = sorted(str(p) for p in found if p in have)
        if not kept:
            raise FlameError(f"--data {source.spec}: none of its {len(found)} shard(s) has embeddings in the store")
        mix.append({"shards": kept, "weight": 1.0 if source.weight is None else source.weight})
    if dist.is_main():
        log.info("data mix (resampled): %s", ", ".join(
            f"{s.spec} {m['weight'] / sum(x['weight'] for x in mix):.0%}" for (s, _), m in zip(sources, mix)))
    return mix


# -- checks --------------------------------------------------------------------------------
def check_store(cfg: TrainConfig, store) -> None:
    """The store has the D and K the settings expect (when they say)."""
    if cfg.embed_dim is not None and cfg.embed_dim != store.dim:
        raise FlameError(f"store {store.path} has D={store.dim} but the model config asks for D={cfg.embed_dim}")
    if cfg.k is not None and cfg.k != store.k:
        raise FlameError(f"store {store.path} has K={store.k} facets but the model config asks for K={cfg.k}")
    if cfg.precision == "bf16" and cfg.device == "cpu":
        log.info("bf16 autocast on CPU requested")


def warn_few_shards(shards: int, data_workers: int) -> None:
    """Fewer shards than data workers: each shard is read by several workers, each keeping its
    share (flame.data.images.worker_shards), so the data is read that many times per epoch."""
    if shards < data_workers and dist.is_main():
        log.warning("%d shards for %d data workers (ranks x --workers): each shard is read by about %d workers "
                    "per epoch; reshard into at least %d shards or use fewer --workers", shards, data_workers,
                    -(-data_workers // shards), data_workers)


def find_resume(cfg: TrainConfig, run: Path) -> Path | None:
    """The checkpoint to resume from (None: start at step 0)."""
    if not cfg.resume:
        return None
    resume_from = latest_checkpoint(run) if cfg.resume == "latest" else Path(cfg.resume)
    if resume_from is None and any(run.glob("checkpoint-*")):
        raise FlameError(f"--resume: {run} has no complete checkpoint")
    if resume_from is None:  # a requeued job that was stopped before its first checkpoint
        log.info("--resume: %s has no checkpoint yet: starting from step 0", run)
    elif not is_complete(resume_from):
        raise FlameError(f"--resume: {resume_from} is not a complete checkpoint (needs {', '.join(CHECKPOINT_FILES)})")
    return resume_from


def check_checkpoint(cfg: TrainConfig, ckpt: Path, store) -> None:
    """The checkpoint was trained for this store's D and K (and, unless --force, its LLM)."""
    from flame.model import FlameModel

    saved = FlameModel.read_config(ckpt)
    text, tower = saved.get("text", {}), saved.get("tower", {})
    if tower.get("embed_dim") != store.dim or text.get("k", store.k) != store.k:
        raise FlameError(
            f"checkpoint {ckpt} was trained for D={tower.get('embed_dim')}, K={text.get('k')} "
            f"but store {store.path} has D={store.dim}, K={store.k}"
        )
    fp_old = (text.get("llm") or {}).get("fingerprint")
    fp_new = (store.manifest.get("llm") or {}).get("fingerprint")
    if fp_old and fp_new and fp_old != fp_new and not cfg.force:
        raise FlameError(f"store {store.path} was made by a different LLM than checkpoint {ckpt}")


def check_settings(cfg: TrainConfig, run: Path) -> None:
    """Unless --force, a resume keeps the run's settings (RUN/train-config.json) and world size."""
    path = run / TRAIN_CONFIG
    if not path.is_file() or cfg.force:
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise FlameError(f"{path} is unreadable; use --force to resume anyway") from None
    new_cfg = cfg.comparable()
    # A setting the run's version did not have yet ran with what is now its default.
    old_cfg = {**{k: v for k, v in TrainConfig().comparable().items() if k not in old.get("config", {})},
               **old.get("config", {})}
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


def usable_data(shards: list[Path], store) -> tuple[list[Path], int, dict]:
    """(shards with embeddings, their sample count, the data signature kept in checkpoints)."""
    from flame.data.images import check_data
    from flame.data.shards import shard_name

    check = check_data(shards, store)
    if check.missing_shards:
        log.warning("%d of %d shards have no embeddings in the store and are skipped (e.g. %s)",
                    len(check.missing_shards), len(shards), check.missing_shards[0])
    samples = sum(int(store.array(shard_name(p)).shape[0]) for p in check.usable)
    return check.usable, samples, data_signature(shards, check.usable, samples)


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
    if old.get("mix") != new.get("mix"):
        return "the data mix (its sources or weights) changed"
    return None


def check_same_data(state: dict, data: dict, ckpt: Path) -> None:
    change = data_change(state.get("data") or {}, data)
    if change:
        raise FlameError(f"--resume: {change} since {ckpt.name} was written, so the data order would differ; "
                         "use --force to resume anyway")


# -- derived defaults (each computed here and nowhere else) --------------------------------
def positives(cfg: TrainConfig, eligible: list[int]) -> int:
    """m: --positives, else min(6, eligible facets)."""
    m = cfg.positives if cfg.positives is not None else min(DEFAULT_POSITIVES, len(eligible))
    if not 1 <= m <= len(eligible):
        raise FlameError(f"--positives {m}: must be between 1 and the {len(eligible)} eligible facets")
    return m


def total_steps(cfg: TrainConfig, samples: int, state: dict | None) -> int:
    """--steps, else --epochs (default 32) of `samples` (the data's, or --train-num-samples). A
    resume whose --epochs are unchanged but whose data size changed keeps the step count the run was planned with."""
    if cfg.steps is not None:
        return cfg.steps
    epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS
    steps = max(1, math.ceil(epochs * samples / (cfg.batch_size * cfg.accum * dist.world_size())))
    planned = (state or {}).get("schedule") or {}
    if planned.get("total") and planned.get("steps") is None and planned.get("epochs") == cfg.epochs \
            and planned["total"] != steps:
        log.info("--epochs %s now gives %d steps; keeping the %d steps this run was planned for "
                 "(pass --steps to change them)", epochs, steps, planned["total"])
        steps = int(planned["total"])
    return steps


def warmup_steps(warmup: int, steps: int) -> int:
    """--warmup, or steps/5 when it would not end before the last step."""
    return min(warmup, steps // 5) if warmup >= steps else warmup


def grad_checkpointing(cfg: TrainConfig) -> bool:
    """Only when asked for (None, from runs that predate the choice, is off): ViT-B/16 at batch
    384 fits an 80 GB GPU without it, and recomputing costs about a quarter of each step."""
    return bool(cfg.grad_checkpointing)


def compile_ready(device: torch.device) -> None:
    """--compile: inductor writes C++ on the CPU and Triton kernels on CUDA; without the toolchain the
    first step would fail deep inside torch, so it is refused before anything trains."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise FlameError("--compile: torch.compile on CUDA needs Triton (pip install triton), "
                             "or leave --compile off")
    elif not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++", "c++") if c):
        raise FlameError("--compile: torch.compile on the CPU needs a C++ compiler (set CXX or install g++), "
                         "or leave --compile off")


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: asked for, or "auto" on a GPU that computes bf16 natively (Ampere or newer;
    a V100 or T4 would emulate it, slower than fp32). Asked for on such a GPU: refused."""
    native = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    if cfg.precision == "bf16" and not native:
        raise FlameError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bf16 "
                         "(it would be emulated, slower than fp32); use --precision fp32 or auto")
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda" and native)


def initial_logit_scale(spec: str, store, shards: list[Path], eligible: list[int], sample: int = 2048) -> float:
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
