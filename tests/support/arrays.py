"""Small numeric helpers: comparisons and stores' worth of unit vectors."""

from __future__ import annotations

import numpy as np


def rel_diff(a, b) -> float:
    """Largest absolute difference relative to the largest magnitude of `b` (tensors or arrays)."""
    return float((a - b).abs().max() / b.abs().max()) if hasattr(a, "abs") else \
        float(np.abs(a - b).max() / np.abs(b).max())


def unit_vectors(n: int, k: int, d: int, seed: int = 0) -> np.ndarray:
    """[n, k, d] float32 rows of unit length, as a store holds them."""
    v = np.random.default_rng(seed).standard_normal((n, k, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def store_manifest(k: int, d: int, dtype: str = "fp16", layer=(2,), fingerprint: str = "abc123",
                   spec: str = "tiny") -> dict:
    """A minimal valid embedding-store manifest with one prompt set of `k` facets."""
    return {
        "format": "flame-embeddings",
        "version": 1,
        "llm": {"spec": spec, "fingerprint": fingerprint},
        "layer": list(layer),
        "positions": "restart",
        "prompt_sets": [{"name": "short", "prefix": "{cap}", "facets": [chr(97 + i) for i in range(k)], "sep": "",
                         "source": "txt"}],
        "facets": [f"short/{i}" for i in range(k)],
        "k": k,
        "dim": d,
        "dtype": dtype,
        "normalized": True,
    }
