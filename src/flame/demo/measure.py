"""Measurements that choose the demo's LLM dtype and refine its time estimates."""

from __future__ import annotations

import time


def measure_llm(spec: str, sample: list[str]) -> dict:
    """Time the facet encoder on `sample` in fp32 and bf16 on this CPU; return the faster dtype
    and its tokens/s (bf16 is fast only with AMX / AVX-512 BF16; on AVX2 it was 6x slower)."""
    import torch

    from flame.facets import FacetEncoder
    from flame.llm import load_llm

    model, tok = load_llm(spec, device="cpu", dtype=torch.float32)
    result = {"threads": torch.get_num_threads(), "float32": 0.0, "bfloat16": 0.0}
    # two interleaved rounds, best of each: a busy machine slows one probe, not a whole dtype
    for _ in range(2):
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model.to(dtype)
            enc = FacetEncoder(model, tok, prompts="long", layer=-2)
            enc.encode(sample[:1])  # warm-up
            enc.tokens, t = 0, time.perf_counter()
            enc.encode(sample)
            result[name] = max(result[name], enc.tokens / max(time.perf_counter() - t, 1e-9))
    result["dtype"] = max(("float32", "bfloat16"), key=lambda k: result[k])
    result["tokens_per_s"] = result[result["dtype"]]
    del model
    return result


def prompt_tokens(spec: str, captions: dict[str, list[str]]) -> int:
    """LLM tokens the packed facet pass will run for these distinct captions, per prompt set."""
    from flame.prompts import PROMPT_SETS, clean_caption

    tok = _tokenizer(spec)
    total = 0
    for set_name, caps in captions.items():
        ps = PROMPT_SETS[set_name]
        extra = sum(len(tok(f, add_special_tokens=False)["input_ids"]) for f in ps.facets)
        for c in dict.fromkeys(caps):
            total += len(tok(ps.prefix.replace("{cap}", clean_caption(c)))["input_ids"]) + extra
    return total


def _tokenizer(spec: str):
    from transformers import AutoTokenizer

    from flame.llm import _resolve

    source, local = _resolve(spec)
    return AutoTokenizer.from_pretrained(source, local_files_only=local)
