"""Small training runs shared by the train tests: the tiny tower's flags, a generated image set
with its store, and reading a checkpoint's weights. The learned-store helpers are the library's
own (`flame.benchmarks.learning`), which the pool-first experiment uses too."""

from __future__ import annotations

from pathlib import Path

import torch

from flame.benchmarks.learning import bag_of_words_store, heldout_r1

__all__ = ["FILES", "TINY", "bag_of_words_store", "heldout_r1", "make_set", "weights"]

TINY = ["--tower", "vit-tiny", "--image-size", "32", "--proj-hidden", "32", "--no-progress", "--no-tensorboard"]

FILES = ("model.safetensors", "config.json", "state.pt")


def make_set(root: Path, shards: int = 3, per: int = 32, seed: int = 0) -> Path:
    from flame.data.synthetic import write_shards

    paths = write_shards(root / "shards", shards * per, shard_size=per, size=40, seed=seed)
    bag_of_words_store(paths, root / "store", dim=16, k=3)
    return root


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))
