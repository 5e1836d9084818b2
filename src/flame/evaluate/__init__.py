"""Evaluation stage: datasets, metrics and tasks in CLIP_benchmark's conventions.

    from flame.evaluate import load_dataset, evaluate, Suite
    ds = load_dataset("wds_imagenet1k", task="zeroshot-classification", language="it")
    result = evaluate(model, ds, task="zeroshot-classification")   # {"dataset", "model", "task", "language", "metrics"}

Modules, each importing only those before it: task_names (the task spellings), classtexts (class
names and templates in any language), datasets (three formats), images (image vectors in
DataLoader workers, cached), metrics (CLIP_benchmark's definitions), tasks (evaluate, Suite),
during (the `flame train --eval` hook), cli (`flame eval`: its Config and main).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_dataset": "flame.evaluate.datasets",
    "EvalDataset": "flame.evaluate.datasets",
    "evaluate": "flame.evaluate.tasks",
    "Suite": "flame.evaluate.tasks",
    "SuiteEntry": "flame.evaluate.tasks",
    "TrainEvaluator": "flame.evaluate.during",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flame.evaluate' has no attribute {name!r}")
