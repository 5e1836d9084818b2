"""A learning check without an LLM: a bag-of-words embedding store and held-out R@1.

`bag_of_words_store` writes a store whose caption vectors are a fixed function of the words
(the sum of one random vector per word, normalised; facet j adds a small facet-specific
offset), so a tower trained against it can be scored on held-out images of the same
captions with `heldout_r1`. Used by `benchmarks/pool_first.py` (and usable by tests) instead of
a test module on `sys.path`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flame.data.shards import shard_name


def bag_of_words_store(shards: Sequence[str | Path], out: str | Path, dim: int = 64, k: int = 1, seed: int = 0):
    """An EmbeddingStore at `out` for the webdataset `shards`: K facets of dimension `dim` per sample."""
    import webdataset as wds

    from flame.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    vocab: dict[str, np.ndarray] = {}
    offsets = rng.standard_normal((k, dim)) * 0.3

    def encode(caption: str) -> np.ndarray:
        v = np.zeros(dim)
        for w in caption.replace("the ", "").split():
            if w not in vocab:
                vocab[w] = rng.standard_normal(dim)
            v += vocab[w]
        v = v[None] + offsets
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    facets = [f"raw/{j}" if k == 1 else f"long/{j}" for j in range(k)]
    manifest = {"llm": {"spec": "bag-of-words", "fingerprint": "bow"}, "layer": 0, "positions": "restart",
                "prompt_sets": [{"name": facets[0].split("/")[0]}], "facets": facets, "k": k, "dim": dim,
                "dtype": "fp16", "normalized": True}
    store = EmbeddingStore.create(out, manifest)
    for p in shards:
        keys, vecs = [], []
        for sample in wds.tarfile_samples([{"url": str(p)}]):
            keys.append(sample["__key__"])
            vecs.append(encode(sample["txt"].decode()))
        store.write_shard(shard_name(Path(p)), keys, np.stack(vecs))
    return store


@torch.no_grad()
def heldout_r1(ckpt: str | Path, store_path: str | Path, shard: str | Path) -> tuple[float, int]:
    """-> (image->text R@1 over the distinct captions of a held-out shard, how many captions);
    images centre-resized, not cropped."""
    import webdataset as wds

    from flame.data.images import load_image, normalize_images
    from flame.model import FlameModel
    from flame.store import EmbeddingStore

    model = FlameModel.load(ckpt).eval()
    store = EmbeddingStore(store_path)
    name = shard_name(Path(shard))
    index = store.index(name)
    images, captions, texts = [], [], {}
    for sample in wds.tarfile_samples([{"url": str(shard)}]):
        caption = sample["txt"].decode()
        captions.append(caption)
        images.append(load_image(sample["jpg"], model.image_size, None))
        texts.setdefault(caption, store.get(name, index[sample["__key__"]]).mean(0))
    names = sorted(texts)
    t = torch.nn.functional.normalize(torch.tensor(np.stack([texts[n] for n in names])), dim=-1)
    emb = model.encode_image(normalize_images(torch.stack(images), model.mean, model.std))
    pred = (emb @ t.T).argmax(1).tolist()
    return float(np.mean([names[p] == c for p, c in zip(pred, captions)])), len(names)
