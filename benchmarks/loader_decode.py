"""`flame train`'s data loader, today's full JPEG decode against the reduced-size decode
(`flame.data.draft`), side by side in one run (issue 15, item 9): images/s per worker on photo-like
JPEGs (quality 90) of 500x375 and 1600x1200 at image size 224, and worker scaling (1 vs 2 workers).
Rounds are interleaved (full, reduced, full, ...) and medians reported, so load from other
processes hits both paths alike.

    nice -n 15 .venv/bin/python benchmarks/loader_decode.py [--seconds 6] [--rounds 3] [--json F]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SIZES = ((500, 375), (1600, 1200))


def photo(w: int, h: int, seed: int) -> bytes:
    """Smooth regions, edges and fine grain: ~1.7 bits/pixel at quality 90, as camera photos are."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (h // 40 + 2, w // 40 + 2, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.float64)
    for _ in range(40):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(10, w // 3), y0 + rng.integers(10, h // 3)
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * 0.6 + rng.uniform(0, 255, 3) * 0.4
    grain = rng.normal(128, 40, (h, w)).clip(0, 255).astype(np.uint8)
    img += (np.asarray(Image.fromarray(grain).filter(ImageFilter.GaussianBlur(1.2))) - 128.0)[..., None] * 0.5
    img += rng.normal(0, 2, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def shards(root: Path, w: int, h: int, samples: int, per_shard: int) -> list[Path]:
    """Tar shards of `samples` JPEGs (8 distinct photos repeated: generation is slow, decoding is the same)."""
    photos = [photo(w, h, seed) for seed in range(8)]
    out = []
    for s in range(0, samples, per_shard):
        p = root / f"{w}x{h}-{s // per_shard:03d}.tar"
        with tarfile.open(p, "w") as tf:
            for i in range(s, min(samples, s + per_shard)):
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                data = photos[i % len(photos)]
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        out.append(p)
    return out


def store(root: Path, paths: list[Path], k: int = 2, dim: int = 8):
    from flame.data.shards import shard_name, tar_keys
    from flame.store import EmbeddingStore

    manifest = {"llm": {"spec": "bench", "fingerprint": "bench"}, "layer": -1, "positions": "restart",
                "prompt_sets": [{"name": "long"}], "facets": [f"long/{i}" for i in range(k)], "k": k, "dim": dim,
                "dtype": "fp16", "normalized": True}
    st = EmbeddingStore.create(root / "store", manifest)
    rng = np.random.default_rng(0)
    for p in paths:
        keys = tar_keys(p)
        v = rng.standard_normal((len(keys), k, dim)).astype(np.float32)
        st.write_shard(shard_name(p), keys, v / np.linalg.norm(v, axis=-1, keepdims=True))
    return st


def rate(paths: list[Path], st, workers: int, reduced: bool, seconds: float, batch: int) -> float:
    """images/s of the DataLoader over about `seconds` after the first batch (workers started)."""
    from flame.data.images import StreamConfig, make_loader

    cfg = StreamConfig(shards=[str(p) for p in paths], store=str(st.path), image_size=224, batch_size=batch, m=1,
                       eligible=[0, 1], reduced_decode=reduced)
    it = iter(make_loader(cfg, workers))
    next(it)
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    elapsed = time.perf_counter() - t0
    del it
    return n * batch / elapsed


def decode_rates(data: list[bytes], rounds: int) -> tuple[float, float]:
    """images/s of `load_image` alone in this process, full and reduced decode alternated image by
    image, each first half the time (the least noisy comparison on a shared machine): medians."""
    import random

    from flame.data.images import load_image

    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for i, d in enumerate(data):
            for reduced in ((False, True) if (r + i) % 2 == 0 else (True, False)):  # each goes first half the time
                t = time.perf_counter()
                load_image(d, 224, random.Random(r * 100 + i), reduce=reduced)
                times[reduced].append(time.perf_counter() - t)
    return 1 / statistics.median(times[False]), 1 / statistics.median(times[True])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds per loader measurement")
    ap.add_argument("--samples", type=int, default=64, help="images in the shards per photo size")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows, decode = [], []
    with tempfile.TemporaryDirectory(prefix="flame-loader-decode-") as tmp:
        for w, h in SIZES:
            root = Path(tmp) / f"{w}x{h}"
            root.mkdir()
            # 2 workers x (shards) so that both workers have whole shards to read
            paths = shards(root, w, h, args.samples, per_shard=max(1, args.samples // 4))
            st = store(root, paths)
            full, red = decode_rates([photo(w, h, seed) for seed in range(4)], args.rounds * 3)
            decode.append({"photo": f"{w}x{h}", "full_img_s": full, "reduced_img_s": red, "ratio": red / full})
            for workers in (1, 2):
                got: dict[bool, list[float]] = {False: [], True: []}
                for r in range(args.rounds):
                    for reduced in ((False, True) if r % 2 == 0 else (True, False)):
                        got[reduced].append(rate(paths, st, workers, reduced, args.seconds, args.batch))
                full, red = statistics.median(got[False]), statistics.median(got[True])
                rows.append({"photo": f"{w}x{h}", "workers": workers, "full_img_s": full, "reduced_img_s": red,
                             "full_per_worker": full / workers, "reduced_per_worker": red / workers,
                             "ratio": red / full})
    one = {(r["photo"], r["workers"]): r for r in rows}
    for r in rows:
        base = one[(r["photo"], 1)]
        r["scaling_full"] = r["full_img_s"] / base["full_img_s"]
        r["scaling_reduced"] = r["reduced_img_s"] / base["reduced_img_s"]
    print(f"machine: {os.cpu_count()} CPUs; image size 224, crop scale 0.9-1 (flame train's default)")
    print("decode + crop alone (one process, alternated image by image):")
    for r in decode:
        print(f"{r['photo']:>10}  full {r['full_img_s']:7.1f} img/s  reduced {r['reduced_img_s']:7.1f} img/s  "
              f"ratio {r['ratio']:.2f}")
    print("flame train's DataLoader (medians of interleaved rounds):")
    print(f"{'photo':>10} {'workers':>7} {'full img/s':>11} {'reduced img/s':>14} {'ratio':>6} "
          f"{'per worker full/red':>20} {'scaling full/red':>17}")
    for r in rows:
        print(f"{r['photo']:>10} {r['workers']:>7} {r['full_img_s']:>11.1f} {r['reduced_img_s']:>14.1f} "
              f"{r['ratio']:>6.2f} {r['full_per_worker']:>9.1f}/{r['reduced_per_worker']:<9.1f} "
              f"{r['scaling_full']:>8.2f}/{r['scaling_reduced']:<8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"decode": decode, "loader": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
