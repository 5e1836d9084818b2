"""Figures behind README's Reliability section for `flame search` and `.json` caption tables
(issue 18, items 14-15), each measured in a fresh child process (peak RSS, bytes written):

    index N D     index N empty photos with a stand-in model (no image decoded): bytes passed to
                  write(2) (wchar; the fp16 vector arrays go through a memory map and add N x D x 2),
                  peak RSS, seconds; then a query on that index: peak RSS, seconds
    captions N    a generated N-row recaption `.json` (one array, ~420 bytes a row); a rank loads
                  1/8 of the keys: peak RSS, seconds

    PYTHONPATH=src .venv/bin/python benchmarks/scale_search.py index 20000 16
    PYTHONPATH=src .venv/bin/python benchmarks/scale_search.py captions 200000

Run it with PYTHONPATH at another checkout to measure that code (the before figures).
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def _wchar() -> int:
    return int(next(ln for ln in Path("/proc/self/io").read_text().splitlines() if ln.startswith("wchar:")).split()[1])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Fake:
    image_size, mean, std, fingerprint = 4, (0.5,) * 3, (0.5,) * 3, "fake"

    def __init__(self, dim):
        self.dim, self.tower_config = dim, SimpleNamespace(embed_dim=dim)

    def transform(self):
        return None

    def encode_image(self, seeds):
        v = torch.from_numpy(np.random.default_rng(int(seeds[0])).standard_normal((len(seeds), self.dim),
                                                                                   dtype=np.float32))
        return torch.nn.functional.normalize(v, dim=-1)

    def encode_text(self, texts, prompts=None):
        return self.encode_image(torch.tensor([7]))


def index(n: int, dim: int, folder: Path) -> None:
    import flame.search.index as si
    from flame.search import build_index

    si.decode_or_blank = lambda p, t, s: (torch.tensor(int(hashlib.sha1(str(p).encode("utf-8", "surrogateescape"))
                                                           .hexdigest()[:8], 16)), True)
    photos = folder / "photos"
    for i in range(n):
        p = photos / f"{i // 1000:04d}" / f"IMG_{i:08d}_holiday.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    w0, t0 = _wchar(), time.perf_counter()
    build_index(photos, Fake(dim), folder / "idx", batch_size=512, workers=0, progress=False)
    print(json.dumps({"what": "index", "n": n, "dim": dim, "written_mb": (_wchar() - w0) / 1e6,
                      "rss_mb": _rss_mb(), "s": round(time.perf_counter() - t0, 1)}), flush=True)


def query(dim: int, folder: Path) -> None:
    from flame.search import search

    t0 = time.perf_counter()
    _, hits, n, _ = search(Fake(dim), folder / "idx", "a red kite", k=10)
    print(json.dumps({"what": "query", "n": n, "dim": dim, "rss_mb": _rss_mb(),
                      "s": round(time.perf_counter() - t0, 1)}), flush=True)


def captions(n: int, folder: Path) -> None:
    rng = random.Random(0)
    words = "a red kite over the beach two children running on a windy day near old boats".split()
    path = folder / "recap.json"
    with open(path, "w") as f:
        f.write("[")
        for i in range(n):
            row = {"__key__": f"{i:09d}", "short": " ".join(rng.choices(words, k=10)),
                   "long": " ".join(rng.choices(words, k=70))}
            f.write(("," if i else "") + json.dumps(row))
        f.write("]")
    base = _rss_mb()
    from flame.data.captions import CaptionTable

    keys = {f"{i:09d}" for i in range(0, n, 8)}
    t0 = time.perf_counter()
    table = CaptionTable(path)
    table.load(["short", "long"], keys=keys)
    assert len(table.column("long")) == len(keys)
    print(json.dumps({"what": "captions", "n": n, "file_mb": round(path.stat().st_size / 1e6, 1),
                      "rss_before_mb": round(base, 1), "rss_mb": round(_rss_mb(), 1),
                      "s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        if sys.argv[1] == "index":
            import subprocess

            n, dim = int(sys.argv[2]), int(sys.argv[3])
            for step in ("build", "query"):
                subprocess.run([sys.executable, __file__, step, str(n), str(dim), tmp], check=True)
        elif sys.argv[1] == "build":
            index(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        elif sys.argv[1] == "query":
            query(int(sys.argv[3]), Path(sys.argv[4]))
        else:
            captions(int(sys.argv[2]), Path(tmp))
