"""How far apart a store's facet vectors are, facet by facet: the training targets of `flame train`.

    python benchmarks/facet_spread.py STORE [STORE ...]

For each facet of each store, over the distinct vectors (the demo and the study template one caption
per combination, so repeated images share a vector): the mean cosine between two different
captions, the mean cosine of each caption to its nearest other caption (how close the hardest
negative is), and the effective dimension of the centred vectors (participation ratio of the
covariance's eigenvalues: 1 when every caption differs along one direction, D when along all).
Targets that crowd together (mean cosine near 1, few effective dimensions) give the sigmoid loss
little to separate images by; the study uses this to ask why more facets did not help.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def facet_vectors(path: Path) -> tuple[list[str], np.ndarray]:
    """(facet names, [N, K, D] float32 over the store's complete shards, dequantised and checked)."""
    from flame.store import EmbeddingStore

    store = EmbeddingStore(path)
    if not store.shards:
        raise SystemExit(f"{path}: no complete shards")
    return store.facet_names, np.concatenate([store.get(name, slice(None)) for name in store.shards])


def spread(vectors: np.ndarray) -> dict[str, float]:
    """vectors: [N, D] (unit norm) -> the three figures of the module docstring, over distinct rows."""
    v = np.unique(vectors, axis=0)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    n = len(v)
    cos = v @ v.T
    off = cos[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    eig = np.clip(np.linalg.eigvalsh(np.cov(v, rowvar=False)), 0, None)
    return {"captions": n, "mean_cos": float(off.mean()), "nearest_cos": float(off.max(1).mean()),
            "eff_dim": float(eig.sum() ** 2 / (eig**2).sum())}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    print("| store | facet | distinct captions | mean cosine | nearest other | effective dim |")
    print("|---|---|---|---|---|---|")
    for path in map(Path, argv):
        names, x = facet_vectors(path)
        for k, name in enumerate(names):
            s = spread(x[:, k])
            print(f"| {path.name} | {name} | {s['captions']} | {s['mean_cos']:.3f} | {s['nearest_cos']:.3f} | "
                  f"{s['eff_dim']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
