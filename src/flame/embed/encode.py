"""The LLM side of `flame embed`: loading one facet encoder per prompt set, and encoding one
shard's captions into its writer (each distinct caption once; repeats copy its stored rows)."""

from __future__ import annotations

import time

import numpy as np

from flame import faults
from flame.embed.config import Config
from flame.embed.plan import Plan
from flame.embed.prefetch import prefetched
from flame.embed.report import Stats
from flame.prompts import clean_caption


def llm_dtype(name: str):
    import torch

    return {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_encoders(cfg: Config, plan: Plan, device: str):
    """-> (model, one FacetEncoder per source, the weights' fingerprint)."""
    from transformers.utils import logging as hf_logging

    from flame.facets import FacetEncoder
    from flame.llm import llm_fingerprint, load_llm

    hf_logging.disable_progress_bar()  # one progress bar per run: ours

    model, tokenizer = load_llm(cfg.llm, device=device, dtype=llm_dtype(cfg.llm_dtype))
    encoders = [
        FacetEncoder(
            model,
            tokenizer,
            prompts=s.prompts,
            layer=plan.layer,
            positions=cfg.positions,
            batch_tokens=cfg.batch_tokens,
            max_batch=cfg.max_batch,
            max_caption_tokens=cfg.max_caption_tokens,
        )
        for s in plan.sources
    ]
    return model, encoders, llm_fingerprint(model)


def _dedupe(caps: list[str]) -> tuple[list[int], list[int], list[int]]:
    """-> (rows to encode, rows that repeat an earlier caption, the row each one repeats)."""
    first: dict[str, int] = {}
    unique, dup_dst, dup_src = [], [], []
    for row, cap in enumerate(caps):
        c = clean_caption(cap)
        if c in first:
            dup_dst.append(row)
            dup_src.append(first[c])
        else:
            first[c] = row
            unique.append(row)
    return unique, dup_dst, dup_src


def _chunks(captions: list[list[str]], plan: Plan, encoders, chunk: int):
    """The host side of one shard, in write order: per source, each chunk of its unique captions
    prepared for the model (`FacetEncoder.prepare`), then the source's repeats."""
    for src, enc, caps in zip(plan.sources, encoders, captions):
        unique, dup_dst, dup_src = _dedupe(caps)
        for start in range(0, len(unique), chunk):
            rows = unique[start : start + chunk]
            yield src, enc, rows, enc.prepare([caps[r] for r in rows]), None
        yield src, enc, None, None, (dup_dst, dup_src, len(caps))


def encode_shard(writer, captions: list[list[str]], plan: Plan, encoders, chunk: int, stats: Stats, bar,
                 prefetch: bool = True) -> None:
    """Every source's captions of one shard into `writer` (L2-normalised float32 -> the store's dtype).
    The host work (tokens, batch tensors) runs on a prefetch thread (`flame.embed.prefetch`); the
    model and every write stay on this thread, in the order they always had."""
    import torch
    import torch.nn.functional as F

    def progress(n_caps, n_tokens):
        stats.tokens += n_tokens
        if bar is not None:
            bar.update(n_caps)
            if not bar.disable:
                elapsed = max(time.perf_counter() - bar.start_t, 1e-9)
                bar.set_postfix_str(f"{stats.tokens / elapsed:,.0f} tok/s", refresh=False)

    with prefetched(_chunks(captions, plan, encoders, chunk), enabled=prefetch) as work:
        for src, enc, rows, prepared, repeats in work:
            facets = slice(src.offset, src.offset + src.prompts.k)
            if repeats is None:
                emb = enc.run(prepared, progress=progress)
                emb = F.normalize(emb.to(torch.float32), dim=-1).numpy()
                writer.write(np.asarray(rows), emb, facets=facets)
                faults.slow_batch()  # test hook: widens the window to kill a job mid-shard
                continue
            dup_dst, dup_src, n = repeats
            if dup_dst:  # repeated captions: copy the stored vectors, bytes identical to recomputing
                writer.copy_rows(np.asarray(dup_dst), np.asarray(dup_src), facets=facets)
                if bar is not None:
                    bar.update(len(dup_dst))
            stats.captions += n
            stats.repeats += len(dup_dst)
