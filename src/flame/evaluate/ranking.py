"""Retrieval recall in bounded memory: queries in chunks, each against every key, torch.topk per row.

Exactly the unchunked computation (`scores = normalize(queries) @ normalize(keys).T`, then
`torch.topk(k)` per row, ties falling where torch.topk puts them): every row of scores is computed
whole and ranked on its own, and topk's result for a row does not depend on the other rows. Only
the number of rows held at a time changes: `rows = budget / (4 bytes x number of keys)` (at least
one, at most 1,024), so the score block stays within `budget` bytes (default 64 MiB on the CPU,
1 GiB on CUDA) however many captions and images there are. One score block serves every k (the
unchunked code recomputed it per k).

What is held besides the caller's vectors: the score block, per-query booleans, and the key side
normalised: in place when the caller lets it (`overwrite`, float32 on the device: no copy), else
one float32 copy (on CUDA: the copy on the GPU), normalised a 16 MiB slice at a time. The query
side is normalised a chunk at a time; `text_rows` picks captions without an indexed copy of the
queries. Measured (benchmarks/eval_memory.py, 1,000 images x 576): 91, 92 and 97 MiB added at
30k, 100k and 300k captions, against 200 MiB, 624 MiB and 2.5 GiB for 8a825a2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

BUDGET = {"cpu": 64 << 20, "cuda": 1 << 30}
MAX_ROWS = 1024


def _normalised(x, rows: torch.Tensor | None, start: int, stop: int, device, already: bool = False) -> torch.Tensor:
    part = x[start:stop] if rows is None else x[rows[start:stop]]
    part = torch.as_tensor(part).to(device, torch.float32)
    return part if already else F.normalize(part, dim=-1)


SLICE_BYTES = 16 << 20  # what one normalisation slice may take (its float32 temporary)


def normalised_keys(x, rows: torch.Tensor | None, device, overwrite: bool = False) -> torch.Tensor:
    """float32 L2-normalised rows of `x` (or of x[rows]) on `device`, built a slice at a time (no
    intermediate float32 copy of the whole input). `overwrite`: a float32 tensor already on
    `device` is normalised in place (no copy at all; the values are the same)."""
    n = len(x) if rows is None else len(rows)
    dim = x.shape[1]
    in_place = (overwrite and rows is None and isinstance(x, torch.Tensor) and x.dtype == torch.float32
                and x.device == torch.device(device) and x.is_contiguous())
    out = x if in_place else torch.empty(n, dim, dtype=torch.float32, device=device)
    step = max(1, SLICE_BYTES // (4 * max(1, dim)))
    for s in range(0, n, step):
        out[s : s + step] = _normalised(x, rows, s, min(s + step, n), device)
    return out


def block_rows(n_keys: int, device: torch.device, budget: int | None = None) -> int:
    budget = budget or BUDGET.get(device.type, BUDGET["cpu"])
    return max(1, min(MAX_ROWS, budget // (4 * max(1, n_keys))))


def recall_hits(queries, q_rows: torch.Tensor | None, keys: torch.Tensor, positive: Callable, ks: Sequence[int],
                device, budget: int | None = None, normalised: bool = False, ties: torch.Tensor | None = None,
                first_max: bool = False) -> dict[int, torch.Tensor]:
    """{k: bool [Q]}: is a positive key among query q's top-k keys? `keys` is normalised already;
    `queries` rows (or queries[q_rows]) are normalised a chunk at a time (unless `normalised`). `positive(rows, idx)`
    says whether key idx[r, j] is a positive of query rows[r] (both on `device`).

    `ties` (bool [Q], filled in place): is query q's top-1 score attained by more than one key?
    Read off the score block the recalls use (from a top-k with k >= 2 already taken, else a
    top-2); not asked for, nothing extra is computed. `first_max`: k = 1 by `torch.argmax`, whose
    tie goes to the lower index (the release's long-caption scripts), instead of `torch.topk`."""
    n_q = len(queries) if q_rows is None else len(q_rows)
    step = block_rows(len(keys), device, budget)
    hits = {k: torch.zeros(n_q, dtype=torch.bool) for k in ks}
    for start in range(0, n_q, step):
        stop = min(start + step, n_q)
        scores = _normalised(queries, q_rows, start, stop, device, normalised) @ keys.T
        rows = torch.arange(start, stop, device=device).view(-1, 1)
        top2 = None  # the two best scores per row, when a top-k already holds them
        for k in ks:
            if k == 1 and first_max:
                idx = scores.argmax(dim=1, keepdim=True)
            else:
                top = scores.topk(min(k, len(keys)), dim=1, largest=True, sorted=True)
                idx, top2 = top.indices, top.values[:, :2] if k >= 2 and top2 is None else top2
            hits[k][start:stop] = positive(rows, idx).any(dim=1).cpu()
        if ties is not None:
            ties[start:stop] = _tied(scores, top2)
        del scores
    return hits


def _tied(scores: torch.Tensor, top2: torch.Tensor | None) -> torch.Tensor:
    """bool per row: the best score occurs more than once in the row (exact equality)."""
    if scores.shape[1] < 2:
        return torch.zeros(len(scores), dtype=torch.bool)
    if top2 is None:
        top2 = scores.topk(2, dim=1, largest=True, sorted=True).values
    return (top2[:, 0] == top2[:, 1]).cpu()
