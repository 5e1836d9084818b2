"""`flame train` step throughput of two source trees side by side, in one run: the same generated
shards and store, the same settings, each tree in its own fresh process, alternated for ROUNDS
rounds; prints the median images/s of each and their ratio (absolute figures on a shared 2-core
machine are noise, the ratio is the figure).

    PYTHONPATH=src .venv/bin/python benchmarks/train_trees.py BEFORE_SRC AFTER_SRC [ROUNDS] [-- extra flame train flags]

e.g. `git worktree add ../base ec618f8`, then
`PYTHONPATH=src .venv/bin/python benchmarks/train_trees.py ../base/src src 5`. A tree may name flags
of its own after a colon (comma-separated): `src src:--compile 3` is one tree without and with
`--compile`.
The step time comes from log.jsonl's `images_per_s` after the first log line (warm-up left out).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS, LOG = 60, 10
FLAGS = ["--tower", "vit-tiny", "--image-size", "64", "--proj-hidden", "64", "--batch-size", "32", "--accum", "2",
         "--workers", "1", "--warmup", "2", "--no-progress", "--no-tensorboard", "--save-every", str(STEPS)]


def make_data(root: Path) -> None:
    """4 shards of 64 generated images and a bag-of-words store (what the train tests use)."""
    from flame.benchmarks.learning import bag_of_words_store
    from flame.data.synthetic import write_shards

    paths = write_shards(root / "shards", 256, shard_size=64, size=40, seed=0)
    bag_of_words_store(paths, root / "store", dim=16, k=3)


def one_run(tree: str, root: Path, out: Path, extra: list[str]) -> float:
    src, _, own = tree.partition(":")
    extra = [*extra, *(own.split(",") if own else [])]
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    cmd = [sys.executable, "-m", "flame", "train", "--data", str(root / "shards"), "--embeddings",
           str(root / "store"), "--out", str(out), "--steps", str(STEPS), "--log-every", str(LOG), *FLAGS, *extra]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_s"] for r in records[1:] if "images_per_s" in r)


def main(argv: list[str]) -> None:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    before, after = argv[0], argv[1]
    rounds = int(argv[2]) if len(argv) > 2 else 3
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root)
        speeds: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(rounds):
            for name, src in (("before", before), ("after", after))[:: 1 if r % 2 == 0 else -1]:
                speeds[name].append(one_run(src, root, root / f"{name}{r}", extra))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(json.dumps({"images_per_s": speeds, "median": med, "ratio_after_before": med["after"] / med["before"]},
                     indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
