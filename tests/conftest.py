"""Shared fixtures: a tiny randomly initialised Llama with a small byte-level BPE
tokenizer, saved with `save_pretrained` so tests exercise the local-folder path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_CONTEXT = 512


def _corpus() -> list[str]:
    from flame.prompts import FACETS, PROMPT_SETS

    words = (
        "a an the dog cat man woman child car tree house red blue green small large photo of on in "
        "with and running sitting standing street park beach mountain sky water city night day"
    ).split()
    lines = [p.prefix for p in PROMPT_SETS.values()] + list(FACETS)
    lines += [" ".join(words[i : i + 6]) for i in range(0, len(words), 3)]
    lines += ["café naïve 東京 привет", "\"quoted\" 'single' ?!.,:;"]
    return lines * 4


def build_tiny_llm(path: Path, *, layers: int = 3, hidden: int = 32, context: int = TINY_CONTEXT, seed: int = 0):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A folder holding a tiny random Llama + tokenizer (a local "model id")."""
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def flame_cache(tmp_path_factory) -> Path:
    """Converted-weights cache shared by the session (the real SmolLM2 is converted once)."""
    path = Path(os.environ.get("FLAME_TEST_CACHE", tmp_path_factory.mktemp("flame-cache")))
    os.environ["FLAME_CACHE"] = str(path)
    return path


@pytest.fixture(scope="module")
def eval_model_dir(tmp_path_factory, tiny_llm_dir) -> Path:
    """A tiny random model folder whose text side is the tiny test LLM, with a `$FLAME_CACHE` of
    this test module's own (text and image vectors cached by one module never serve another)."""
    from support.evalsets import tiny_model_folder

    mp = pytest.MonkeyPatch()
    mp.setenv("FLAME_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield tiny_model_folder(tmp_path_factory.mktemp("model") / "m", tiny_llm_dir)
    mp.undo()
