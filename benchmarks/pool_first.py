"""Quality side of `--pool-first` (the speed side is `flame bench train`): the same short CPU
run as the learning test, per-token projection vs pool-then-project, held-out R@1 of each.

    .venv/bin/python benchmarks/pool_first.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flame.benchmarks.learning import bag_of_words_store, heldout_r1
from flame.cli import main as flame
from flame.data.synthetic import combos, write_shards


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pool-first-"))
    pool = combos()
    train = write_shards(tmp / "train", 1024, shard_size=256, size=32, seed=1, pool=pool)
    held = write_shards(tmp / "held", 256, shard_size=256, size=32, seed=2, prefix="heldout", pool=pool)
    bag_of_words_store(train + held, tmp / "store", dim=32)
    for variant, extra in (("per-token projector (FLAME)", []), ("pool first", ["--pool-first"])):
        out = tmp / variant.split()[0]
        flame(["train", "--data", str(tmp / "train"), "--embeddings", str(tmp / "store"), "--out", str(out),
               "--tower", "vit-tiny", "--image-size", "32", "--proj-hidden", "64", "--no-progress",
               "--no-tensorboard", "--batch-size", "64", "--steps", "400", "--warmup", "10", "--lr", "1e-3",
               "--weight-decay", "0.0", "--workers", "1", "--save-every", "400", "--log-every", "400", *extra])
        r1, n = heldout_r1(out / "checkpoint-400", tmp / "store", held[0])
        print(f"{variant:30s} held-out R@1 {r1:.3f} over {n} captions (chance {1 / n:.4f})")


if __name__ == "__main__":
    main()
