"""The three task names as CLIP_benchmark spells them, and the spellings `flame eval` accepts.

A leaf module: datasets (checking a dataset fits its task), tasks and the command line all
need the names, and none of them may import another just for that.
"""

from __future__ import annotations

from flame.errors import FlameError

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
