"""load_llm: every accepted spec form, the GGUF cache, and one-line refusals."""

from __future__ import annotations

import logging

import pytest
import torch

from flame.errors import FlameError
from flame.llm import llm_fingerprint, load_llm


def test_local_folder_loads_frozen(tiny_llm_dir):
    model, tok = load_llm(str(tiny_llm_dir))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.padding_side == "right" and tok.pad_token is not None
    assert model.dtype == torch.float32


def test_fingerprint_tells_weights_apart(tiny_llm_dir, tmp_path):
    from conftest import build_tiny_llm

    a, _ = load_llm(str(tiny_llm_dir))
    b, _ = load_llm(str(build_tiny_llm(tmp_path / "other", seed=1)))
    assert llm_fingerprint(a) == llm_fingerprint(load_llm(str(tiny_llm_dir))[0])
    assert llm_fingerprint(a) != llm_fingerprint(b)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no/such/folder/", "unknown LLM"),
        ("./missing-model", "unknown LLM"),
        ("weights.gguf", "GGUF file not found"),
        ("not a valid id!", "built-in name"),
        ("some-org/some-model", "cannot read the model config"),  # hub id while the hub is unreachable
    ],
)
def test_bad_specs_are_one_clear_line(spec, message):
    with pytest.raises(FlameError, match=message) as info:
        load_llm(spec)
    assert "\n" not in str(info.value)


def test_not_a_causal_lm_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(FlameError, match="not a decoder-only causal language model"):
        load_llm(str(tmp_path / "bert"))


@pytest.mark.slow
def test_builtin_gguf_is_converted_once_then_cached(flame_cache, caplog):
    caplog.set_level(logging.INFO, logger="flame.llm")
    first, tok = load_llm("smollm2-135m")
    converted = [r for r in caplog.records if "converting" in r.message]
    caplog.clear()
    second, _ = load_llm("smollm2-135m")
    assert not [r for r in caplog.records if "converting" in r.message], "second load must read the cache"
    assert list(flame_cache.glob("gguf-SmolLM2-*/model.safetensors"))
    assert converted or list(flame_cache.glob("gguf-*"))  # converted now, or by an earlier test in this session
    assert first.config.num_hidden_layers == 30 and first.config.hidden_size == 576
    assert llm_fingerprint(first) == llm_fingerprint(second)
    ids = tok("a photo of a dog", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
