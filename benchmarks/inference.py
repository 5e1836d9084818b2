"""Inference-side figures behind README's `FlameModel` and `flame search` sections:

1. the text cache at scale (no LLM): write N captions' vectors in the encoder's chunks, then a
   fresh reader (what a new process does) indexes, checks and reads all of them;
2. `--llm`: a first evaluation with the built-in SmolLM2 (LLM load + long set) vs a repeated
   one from the cache (a fresh TextEncoder; the LLM is not loaded), side by side;
3. `flame search index` on generated photos: full index, a rerun after adding 10, a rerun
   with nothing new.

    .venv/bin/python benchmarks/inference.py [--llm]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def text_cache(tmp: Path, n: int, dim: int) -> str:
    import flame.textenc as te

    folder = tmp / f"space-{n}-{dim}"
    rng = np.random.default_rng(0)
    caps = [f"a photo of the number {i}, seen from far away" for i in range(n)]
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    writer = te._Space(folder, {})
    t = time.perf_counter()
    for s in range(0, n, te.CHUNK):
        writer.add(caps[s : s + te.CHUNK], vecs[s : s + te.CHUNK])
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    reader = te._Space(folder, {})
    reader.refresh()
    missing = reader.missing(caps)
    t_index = time.perf_counter() - t
    order = rng.permutation(n)
    t = time.perf_counter()
    out = reader.get([caps[i] for i in order])
    t_get = time.perf_counter() - t
    assert not missing and np.allclose(out, vecs[order], atol=1e-2 * np.abs(vecs).max())
    size = sum(p.stat().st_size for p in folder.iterdir())
    return (f"text cache, {n:,} captions x D={dim}: write {n / t_write:,.0f} captions/s; a fresh reader indexes "
            f"and checks all in {t_index:.3f} s and reads them (shuffled) at {n / t_get:,.0f}/s; "
            f"{size / n:,.0f} bytes/caption")


def llm_repeat(tmp: Path) -> str:
    import torch

    from flame.llm import llm_fingerprint, load_llm
    from flame.prompts import PROMPT_SETS
    from flame.textenc import TextEncoder

    words = "dog cat child kite beach red blue street market night rain old bicycle boat river".split()
    caps = [f"A {words[i % 15]} and a {words[i * 7 % 15]} near the {words[i * 3 % 15]}, photo {i}." for i in range(200)]
    model, _ = load_llm("smollm2-135m", device="cpu")
    text = {"llm": {"spec": "smollm2-135m", "fingerprint": llm_fingerprint(model)}, "layer": [29],
            "positions": "restart", "prompt_sets": [PROMPT_SETS["long"].to_dict()], "dim": 576}
    del model
    t = time.perf_counter()
    first = TextEncoder(text, cache_dir=tmp / "text").encode(caps, "long")
    t1 = time.perf_counter() - t
    again = TextEncoder(text, cache_dir=tmp / "text")
    t = time.perf_counter()
    second = again.encode(caps, "long")
    t2 = time.perf_counter() - t
    return (f"200 captions, long set, SmolLM2-135M on CPU: first {t1:.1f} s (LLM load + encode), repeat "
            f"{t2 * 1000:.0f} ms from the cache ({t1 / t2:,.0f}x; LLM loads {again.loads}; identical "
            f"{torch.equal(first, second)})")


def search_index(tmp: Path) -> str:
    from PIL import Image

    from flame.cli import main as flame
    from flame.model import FlameModel
    from flame.vision import TowerConfig

    rng = np.random.default_rng(0)

    def photo(i: int) -> None:
        p = tmp / "photos" / f"album{i % 8}" / f"img{i:04d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((320, 240)).save(p, quality=90)

    for i in range(400):
        photo(i)
    FlameModel(TowerConfig("vit-tiny", embed_dim=576, proj_hidden=576), {"llm": {"spec": "smollm2-135m"}}).save(
        tmp / "model")
    argv = ["search", "index", str(tmp / "photos"), "--model", str(tmp / "model"), "--workers", "2", "--no-progress"]

    def timed() -> float:
        t = time.perf_counter()
        assert flame(argv) == 0
        return time.perf_counter() - t

    full = timed()
    for i in range(400, 410):
        photo(i)
    plus10, nothing = timed(), timed()
    return (f"flame search index, 400 photos 320x240 (vit-tiny 64 px, D 576, 2 workers): full {full:.1f} s; "
            f"+10 new {plus10:.1f} s ({full / plus10:.1f}x less); nothing new {nothing:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", action="store_true", help="also time SmolLM2 first vs repeated (minutes on CPU)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flame-inference-"))
    try:
        lines = [text_cache(tmp, 50_000, 576), text_cache(tmp, 20_000, 5120)]
        if args.llm:
            lines.append(llm_repeat(tmp))
        lines.append(search_index(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
