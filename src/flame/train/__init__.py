"""`flame train`: train the image tower against stored facet embeddings.

    flame train --data 'cc3m/{00000..00575}.tar' --embeddings STORE --out RUN
    torchrun --nproc_per_node 8 -m flame train --config recipe.yaml ...

Settings come from (later wins) the FLAME recipe defaults (`TrainConfig`), `--config YAML`
(keys = the long flag names with `_`), and the flags given. Everything is validated and planned
before any training time is spent; every user error is one `FlameError` line. The run folder's
layout is `flame.runfolder`'s; a step whose loss or gradient is not finite is skipped on every
rank. The frozen LLM is never loaded: only its stored embeddings are read.

The package, in the order a run uses it:
    config      TrainConfig: every setting once (type, default, help, range)
    plan        checks and derived defaults, before any training time is spent
    loop        Trainer: resume, then `while step < steps: train_step, log, evaluate, checkpoint`
    accumulate  one step's gradients over its micro-batches, exactly the full batch's
    state       TrainState: step, data positions, counters, RNG (state_dict / load_state_dict)
    optim       weight-decay groups, AdamW, warm-up + cosine schedule
    guard       the non-finite guard
    logger      log.jsonl + TensorBoard, progress bar, running loss
    checkpoint  atomic save / prune / delete, safe state.pt loading, the run-folder lock
    launch      train(cfg): distributed setup and one-line errors across ranks
"""

from __future__ import annotations

from flame.runfolder import CHECKPOINT_FILES, LEDGER, LOCK, STATE, TRAIN_CONFIG, is_complete, read_ledger, write_file
from flame.train.checkpoint import (
    RunLock,
    clean_temporaries,
    delete_checkpoint,
    load_state,
    prune,
    save_checkpoint,
)
from flame.train.config import DESCRIPTION, RESUME_FREE, TrainConfig, validate
from flame.train.launch import train
from flame.train.logger import Logger
from flame.train.optim import lr_lambda, param_groups
from flame.train.plan import Plan, data_change, data_signature, plan
from flame.train.state import TrainState, rng_state, set_rng_state

Config = TrainConfig


def main(cfg: TrainConfig) -> int:
    """The `flame train` command (flame.cli builds `cfg` from the flags and --config)."""
    return train(cfg)


__all__ = [
    "CHECKPOINT_FILES", "DESCRIPTION", "LEDGER", "LOCK", "RESUME_FREE", "STATE", "TRAIN_CONFIG", "Config", "Logger",
    "Plan", "RunLock", "TrainConfig", "TrainState", "clean_temporaries", "data_change", "data_signature",
    "delete_checkpoint", "is_complete", "load_state", "lr_lambda", "main", "param_groups", "plan", "prune",
    "read_ledger", "rng_state", "save_checkpoint", "set_rng_state", "train", "validate", "write_file",
]
