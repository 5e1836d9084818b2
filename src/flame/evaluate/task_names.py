"""The three task names as CLIP_benchmark spells them, the spellings `flame eval` accepts, and
the defaults the tasks and the command line share (`MAX_UNREADABLE`, `PROBE`).

A leaf module: datasets (checking a dataset fits its task), tasks and the command line all
need the names, and none of them may import another just for that.
"""

from __future__ import annotations

from flame.errors import FlameError

MAX_UNREADABLE = 0.1  # share of a split's images that may be unreadable before an evaluation is refused
# the linear probe: CLIP_benchmark's protocol (EVAL.md section 6) and its settings
PROBE = {"method": "clip-benchmark", "lr": 0.1, "epochs": 20, "batch_size": 512, "val_split": None,
         "val_proportion": None, "seed": 0}

TASKS = {  # accepted spellings -> CLIP_benchmark's name
    "zeroshot-classification": "zeroshot_classification",
    "zeroshot_classification": "zeroshot_classification",
    "classification": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "zeroshot-retrieval": "zeroshot_retrieval",
    "zeroshot_retrieval": "zeroshot_retrieval",
    "linear-probe": "linear_probe",
    "linear_probe": "linear_probe",
}


def canonical_task(task: str) -> str:
    if task not in TASKS:
        raise FlameError(f"unknown task {task!r}: zeroshot-classification, retrieval or linear-probe")
    return TASKS[task]
