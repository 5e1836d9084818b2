"""`flame bench gpu` parts on the text side, with random-weight LLMs built here (nothing is
downloaded): the packed facet pass on a Mistral-Nemo-shaped model (packed against separate
passes, the attention kernel that ran, tokens/s and MFU for the raw, short and long sets), and
`flame embed` end to end on the device against a CPU fp32 run of the same captions."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import torch

from flame.benchmarks.facets import WORDS, make_captions
from flame.benchmarks.gpu_common import Context, free, sync

# Mistral-Nemo-12B's block (hidden 5120, 32 query / 8 KV heads of 128, MLP 14336), a few of them
NEMO = {"hidden_size": 5120, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16}
SETS = ("raw", "short", "long")


def build_tokenizer(vocab: int = 800):
    """A byte-level BPE tokenizer trained here on the prompt sets and caption words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from flame.prompts import FACETS, PROMPT_SETS

    corpus = [p.prefix for p in PROMPT_SETS.values()] + list(FACETS)
    corpus += [" ".join(WORDS[i : i + 8]) for i in range(0, len(WORDS), 4)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def build_llm(tokenizer, shape: dict, layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight Mistral of `shape`, built straight on `device` in `dtype`, frozen."""
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, max_position_embeddings=4096,
                           sliding_window=None, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **shape)
    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: no fp32 copy of a 1B-parameter model on the way
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(before)
    if next(model.parameters()).dtype != dtype:  # a transformers that built it in its own default
        model.to(dtype)
    return model.to(device).eval().requires_grad_(False)


def _linear_params(block: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))


class ForwardClock:
    """Device time of the decoder blocks per forward (from the first block's start to the last
    block's end), by module hooks: the facet encoder's own work around the forward (tokenizing,
    masks, copies) is left out. Also counts the padded tokens each forward ran."""

    def __init__(self, first: torch.nn.Module, last: torch.nn.Module, device: torch.device):
        self.device, self.pairs, self.padded = device, [], 0
        self._handles = [first.register_forward_pre_hook(self._start, with_kwargs=True),
                         last.register_forward_hook(self._end)]

    def _stamp(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        self.padded += x.shape[0] * x.shape[1]
        self.pairs.append([self._stamp(), None])

    def _end(self, module, args, output):
        self.pairs[-1][1] = self._stamp()

    def seconds(self) -> float:
        sync(self.device)
        if self.device.type == "cuda":
            return sum(a.elapsed_time(b) for a, b in self.pairs) / 1000
        return sum(b - a for a, b in self.pairs)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def attention_ops(encoder, captions: list[str]) -> dict:
    """The attention implementation transformers runs and the SDPA kernel it reached (from the
    aten ops a profiled encode called)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encoder.encode(captions)
    ops = sorted({e.key for e in prof.key_averages() if "attention" in e.key or "scaled_dot" in e.key})
    kinds = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention": "mem_efficient",
             "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_attention_math": "math",
             "_flash_attention_forward": "flash", "_efficient_attention_forward": "mem_efficient"}
    ran = sorted({kind for op in ops for name, kind in kinds.items() if name in op})
    if not ran and any("scaled_dot_product_attention" in op for op in ops):
        ran = ["math"]
    return {"attn_implementation": encoder.model.config._attn_implementation, "sdpa_kernel": ran, "ops": ops}


def _flops(encoder, captions: list[str], linear: int, d_attn: int, layers: int) -> float:
    """Model FLOPs of the packed pass over `captions`: 2 x (block weights) per token plus causal
    attention over each packed sequence (QK^T and AV: 4 x d_attn per attended pair), per block."""
    total = 0.0
    for caption in dict.fromkeys(captions):
        n = len(encoder.layout(caption)[0])
        total += 2 * linear * n + 4 * d_attn * n * (n + 1) / 2
    return total * layers


def _throughput(ctx: Context, encoder, captions: list[str], flops: float) -> dict:
    from flame.facets import decoder_layers

    blocks = decoder_layers(encoder.model)
    clock = ForwardClock(blocks[0], blocks[max(encoder.layer) - 1], ctx.device)
    tokens = encoder.tokens
    try:
        sync(ctx.device)
        t = time.perf_counter()
        encoder.encode(captions)
        sync(ctx.device)
        wall = time.perf_counter() - t
        forward = clock.seconds()
    finally:
        clock.close()
    tokens = encoder.tokens - tokens
    return {"captions": len(captions), "tokens": tokens, "forwards": len(clock.pairs),
            "padding_share": 1 - tokens / clock.padded, "max_batch": encoder.max_batch,
            "batch_tokens": encoder.batch_tokens, "end_to_end_seconds": wall, "forward_seconds": forward,
            "end_to_end_tokens_per_s": tokens / wall, "forward_tokens_per_s": tokens / forward,
            "forward_tflops": flops / forward / 1e12, "forward_mfu": ctx.mfu(flops, forward),
            "end_to_end_mfu": ctx.mfu(flops, wall)}


def _one_set(ctx: Context, model, tokenizer, name: str, captions: list[str], n_check: int) -> dict:
    from flame.facets import FacetEncoder, decoder_layers

    cfg = model.config
    encoder = FacetEncoder(model, tokenizer, prompts=name, layer=-1)
    check = captions[:n_check]
    packed, separate = encoder.encode(check), encoder.encode(check, packed=False)
    cos = torch.nn.functional.cosine_similarity(packed, separate, dim=-1)
    diff = (packed - separate).abs()
    out = {"k": encoder.k, "packed_vs_separate": {
        "captions": len(check), "max_abs": float(diff.max()), "max_rel": float(diff.max() / separate.abs().max()),
        "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}}
    flops = _flops(encoder, captions, _linear_params(decoder_layers(model)[0]), cfg.num_attention_heads * cfg.head_dim,
                   max(encoder.layer))
    out["flops"] = flops
    out["default"] = _throughput(ctx, encoder, captions, flops)  # flame embed's batching
    wide = FacetEncoder(model, tokenizer, prompts=name, layer=-1, max_batch=1 << 20)
    wide.encode(captions[: min(len(captions), 64)])  # warm the new shapes
    out["token_budget_only"] = _throughput(ctx, wide, captions, flops)  # the token budget alone binds
    return out


def facet_pass(ctx: Context) -> dict:
    """The packed facet pass on a random Mistral-Nemo-shaped model (4 blocks, bf16 on CUDA; a tiny
    one in fp32 on the CPU in quick mode), the embedding read after the last block."""
    tokenizer = build_tokenizer()
    shape, layers = (TINY, 2) if ctx.quick else (NEMO, 4)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    model = build_llm(tokenizer, shape, layers, ctx.device, dtype)
    n, (lo, hi) = (12, (20, 40)) if ctx.quick else (1024, (100, 200))
    captions = make_captions(tokenizer, n=n, lo=lo, hi=hi, seed=1)
    out = {"model": {**shape, "layers": layers, "vocab": len(tokenizer), "dtype": str(dtype).replace("torch.", ""),
                     "parameters": sum(p.numel() for p in model.parameters())},
           "caption_tokens": [lo, hi]}
    from flame.facets import FacetEncoder

    warm = FacetEncoder(model, tokenizer, prompts="long", layer=-1)
    warm.encode(captions[:8])
    out["attention"] = attention_ops(warm, captions[:4])
    for name in SETS:
        out[name] = _one_set(ctx, model, tokenizer, name, captions, 4 if ctx.quick else 32)
    del model
    free(ctx.device)
    return out


# ---- flame embed end to end ----------------------------------------------------------------------
def _caption_shards(folder: Path, tokenizer, shards: int, per: int) -> Path:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    captions = make_captions(tokenizer, n=shards * per, lo=10, hi=60, seed=2)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"caps-{s:05d}.tar")) as sink:
            for i in range(per):
                sink.write({"__key__": f"{s:03d}{i:05d}", "txt": captions[s * per + i]})
    return folder


def quietly(fn, *args) -> tuple[int, str]:
    """Run a flame command's main; -> (its return code, what it printed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = fn(*args)
    return code, buf.getvalue()


def embed_end_to_end(ctx: Context) -> dict:
    """`flame embed` (raw, short and long sets) of the same caption shards with a tiny random LLM
    saved to disk: on the device as `flame embed` runs there (bf16 on CUDA; in quick mode on the CPU,
    bf16 there too) against the CPU in fp32; cosine of every stored vector pair."""
    import numpy as np

    from flame.config import validate
    from flame.embed import Config, main
    from flame.store import EmbeddingStore

    tokenizer = build_tokenizer()
    llm = ctx.root / "embed-llm"
    build_llm(tokenizer, TINY, 2, torch.device("cpu"), torch.float32, seed=3).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    data = _caption_shards(ctx.root / "embed-shards", tokenizer, 2, 8 if ctx.quick else 32)
    runs = {"device": (str(ctx.device), "auto" if ctx.cuda else "bfloat16"), "cpu_fp32": ("cpu", "float32")}
    out: dict = {}
    for label, (device, dtype) in runs.items():
        cfg = validate(Config(data=[str(data)], prompts=["raw=txt", "short=txt", "long=txt"], llm=str(llm),
                              out=ctx.root / f"store-{label}", device=device, llm_dtype=dtype))
        t = time.perf_counter()
        code, said = quietly(main, cfg)
        if code != 0:
            raise RuntimeError(f"flame embed ({label}) exited {code}: {said.strip()[-500:]}")
        out[label] = {"device": device, "llm_dtype": dtype, "seconds": time.perf_counter() - t}
    a, b = (EmbeddingStore(ctx.root / f"store-{label}") for label in runs)
    if a.shards != b.shards or any(a.keys(s) != b.keys(s) for s in a.shards):
        raise RuntimeError("the two stores hold different shards or keys")
    va = np.concatenate([a.get(s, slice(None)) for s in a.shards])
    vb = np.concatenate([b.get(s, slice(None)) for s in b.shards])
    cos = (va * vb).sum(-1) / (np.linalg.norm(va, axis=-1) * np.linalg.norm(vb, axis=-1))
    out.update({"vectors": int(cos.size), "k": a.k, "dim": a.dim, "store_dtype": a.dtype,
                "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                "max_abs": float(np.abs(va - vb).max())})
    return out
