"""Packed facet-decoupled pass versus K separate passes, on the same captions, batched
the same way, in one process. Reports throughput, their ratio and the token-count bound
on that ratio (naive tokens / packed tokens), and how far apart the two results are."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import torch

from flame.benchmarks.base import BenchConfig, report
from flame.config import at_least, setting

WORDS = (
    "a an the old young small large red blue green yellow wooden stone glass bright dark quiet busy "
    "dog cat horse bird child woman man group couple team crowd car bicycle boat train bus tree flower "
    "house bridge street market river lake beach mountain forest field garden kitchen table window door "
    "sitting standing walking running holding looking playing reading riding carrying waiting near behind "
    "under beside across through with while during and at on in of sunset morning evening rain snow light "
    "shadow reflection background foreground detail texture pattern colour wall roof sky cloud water"
).split()


def make_captions(tokenizer, n: int = 64, lo: int = 100, hi: int = 200, seed: int = 0) -> list[str]:
    """Deterministic long captions of lo..hi tokens (uniform), ~150 on average."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        words: list[str] = []
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < target:
            words.extend(rng.choice(WORDS) for _ in range(8))
            if rng.random() < 0.3:
                words[-1] += ","
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > target:
            words.pop()
        captions.append(" ".join(words).capitalize() + ".")
    return captions


class _PeakRSS:
    """Peak resident memory above the starting level while the block runs (sampled)."""

    def __enter__(self):
        import psutil  # here: `flame bench gpu` imports this module and must not need psutil

        self.proc, self.base, self.peak, self._run = psutil.Process(), psutil.Process().memory_info().rss, 0, True
        self.peak = self.base

        def sample():
            while self._run:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._run = False
        self._thread.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _timed(encoder, captions, packed: bool, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tokens0 = encoder.tokens
    with _PeakRSS() as mem:
        t = time.perf_counter()
        out = encoder.encode(captions, packed=packed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else mem.mib
    return out, seconds, encoder.tokens - tokens0, peak


@dataclass
class Config(BenchConfig):
    """`flame bench facets` settings."""

    llm: str = setting("smollm2-135m", help="LLM spec (a built-in name, hub id, folder or GGUF file)")
    prompts: str = setting("long", help="prompt set name or file")
    layer: int = setting(-2, help="decoder block (1-based, negative from the top)")
    captions: int = setting(64, check=at_least(1), help="number of synthetic captions")
    repeats: int = setting(2, check=at_least(1), help="timed runs per path; the fastest counts")
    device: str | None = setting(None, shown="cuda if available", help="cpu, cuda, cuda:1 ...")
    attn: str = setting("sdpa", choices=("sdpa", "eager"), help="attention implementation")


def main(cfg: Config) -> int:
    return report("facets", run(cfg), cfg.json)


def run(cfg: Config) -> dict:
    from flame.facets import FacetEncoder
    from flame.llm import load_llm

    model, tokenizer = load_llm(cfg.llm, device=cfg.device, attn_implementation=cfg.attn)
    device = next(model.parameters()).device
    encoder = FacetEncoder(model, tokenizer, prompts=cfg.prompts, layer=cfg.layer)
    captions = make_captions(tokenizer, n=cfg.captions)
    encoder.encode(captions[:4])
    encoder.encode(captions[:4], packed=False)  # warm-up both paths
    best = {}
    for _ in range(cfg.repeats):
        for packed in (False, True):
            out, seconds, tokens, peak = _timed(encoder, captions, packed, device)
            if packed not in best or seconds < best[packed][1]:
                best[packed] = (out, seconds, tokens, peak)
    (naive, t_naive, tok_naive, mem_naive), (packed, t_packed, tok_packed, mem_packed) = best[False], best[True]
    caption_tokens = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in captions]
    return {
        "llm": cfg.llm,
        "device": str(device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "facets": encoder.k,
        "captions": len(captions),
        "caption_tokens_mean": sum(caption_tokens) / len(caption_tokens),
        "naive_captions_per_s": len(captions) / t_naive,
        "packed_captions_per_s": len(captions) / t_packed,
        "speedup": t_naive / t_packed,
        "token_bound": tok_naive / tok_packed,
        "speedup_over_bound": (t_naive / t_packed) / (tok_naive / tok_packed),
        "naive_tokens_per_s": tok_naive / t_naive,
        "packed_tokens_per_s": tok_packed / t_packed,
        "max_rel_diff": float((packed - naive).abs().max() / naive.abs().max()),
        "naive_peak_mib": mem_naive,
        "packed_peak_mib": mem_packed,
    }
