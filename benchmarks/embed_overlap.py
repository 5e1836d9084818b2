"""`flame embed` throughput, today's code against this tree, side by side in one run (issue 15,
item 11): the same caption shards, the embedded default LLM (SmolLM2-135M), rounds interleaved
(base, this tree with --no-prefetch, this tree), medians of captions/s over the encoding itself
(`_encode_all`: tar reading, tokenizing, the model, writes, fsync; not the model load). Checks that
every store is bit-identical to the base's.

    git archive <base commit> src | tar -x -C /tmp/flame-base      # today's code
    nice -n 15 .venv/bin/python benchmarks/embed_overlap.py --base /tmp/flame-base/src [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"
WORDS = ("a man woman dog cat red blue green small large old young street beach park city house car bike tree "
         "water sky night day standing sitting running walking with on in at near the of and holding looking "
         "photo view people group child table window road mountain river boat train flowers field snow").split()

# Run inside the interpreter under test: time `_encode_all` (the model already loaded) of one embed.
DRIVER = """
import json, sys, time
from flame.embed import worker
from flame.cli import main
real, seen = worker._encode_all, {}
def timed(*a, **k):
    t = time.perf_counter(); out = real(*a, **k); seen["s"] = time.perf_counter() - t; seen["n"] = out.captions
    return out
worker._encode_all = timed
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": seen["s"], "captions": seen["n"]}))
"""


def captions_shards(root: Path, shards: int, per_shard: int, seed: int = 0) -> Path:
    import io
    import tarfile

    rng = random.Random(seed)
    root.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(root / f"data-{s:04d}.tar", "w") as tf:
            for i in range(per_shard):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 24))).encode()
                for ext, data in (("txt", text), ("jpg", b"\xff\xd8not an image")):
                    info = tarfile.TarInfo(f"{s:04d}{i:05d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return root


def run(src: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-c", DRIVER, "embed", *args, "--out", str(out)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"embed under {src} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def store_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="src folder of today's code")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--per-shard", type=int, default=400)
    ap.add_argument("--prompts", nargs="+", default=["raw=txt"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flame-embed-overlap-") as tmp:
        data = captions_shards(Path(tmp) / "shards", args.shards, args.per_shard)
        common = ["--data", str(data), "--prompts", *args.prompts]
        run(HERE, common, Path(tmp) / "warm")  # converts SmolLM2 into the cache once
        variants = {"base": (args.base, []), "no-prefetch": (HERE, ["--no-prefetch"]), "prefetch": (HERE, [])}
        rates: dict[str, list[float]] = {v: [] for v in variants}
        stores: dict[str, dict[str, bytes]] = {}
        for r in range(args.rounds):
            for name, (src, extra) in variants.items():
                out = Path(tmp) / f"{name}-{r}"
                got = run(src, common + extra, out)
                rates[name].append(got["captions"] / got["seconds"])
                stores.setdefault(name, store_bytes(out))
    base = statistics.median(rates["base"])
    identical = {name: stores[name] == stores["base"] for name in variants}
    print(f"flame embed, SmolLM2-135M on the CPU ({os.cpu_count()} CPUs), prompts {' '.join(args.prompts)}, "
          f"{args.shards} x {args.per_shard} captions, medians of {args.rounds} interleaved rounds")
    print(f"{'variant':>12} {'captions/s':>11} {'vs base':>8} {'store bit-identical':>20}")
    for name in variants:
        med = statistics.median(rates[name])
        print(f"{name:>12} {med:>11.1f} {med / base:>8.3f} {str(identical[name]):>20}")
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "identical": identical}, indent=1) + "\n")


if __name__ == "__main__":
    main()
