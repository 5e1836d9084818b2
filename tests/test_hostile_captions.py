"""Hostile captions: special-token text, huge captions, and arbitrary text (property-based).

A caption is data: it must never become a control token, never change how many facets are read or
where relative to the prefix, and never crash the encoder or give non-finite vectors.
"""

from __future__ import annotations

import pytest
import torch
from test_release_text import bos_tokenizer

from flame.facets import FacetEncoder
from flame.llm import load_llm

MODES = [("raw", "restart"), ("long", "restart"), ("short", "continue"), ("long", "continue")]


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir):
    return load_llm(str(tiny_llm_dir))


@pytest.fixture(scope="module")
def tiny_bos(tiny_llm_dir):
    return load_llm(str(tiny_llm_dir))[0], bos_tokenizer()


# ---- special-token text ------------------------------------------------------------------------
def special_ids(tok) -> set[int]:
    return set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}


def special_strings(tok) -> list[str]:
    own = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    return sorted(set(own) | {"<s>", "</s>", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "[INST]"})


def check_no_control_tokens(model, tok) -> None:
    """Every control token of a packed sequence is one the template has with an empty caption, at the
    same offset from the start (in the prefix: BOS) or from the end (in the facets: the release's
    `<s>` separator); the caption's special-token text is plain text."""
    special = special_ids(tok)
    for set_name, positions in MODES:
        enc = FacetEncoder(model, tok, prompts=set_name, positions=positions)
        facet_tokens = sum(map(len, enc._facets()))
        base, _ = enc.layout("")
        base_prefix = len(base) - facet_tokens
        for s in special_strings(tok):
            for cap in (s, f"a dog {s} and a cat{s}", f"{s}{s}", f'x:"{s}" {s}'):
                ids, _ = enc.layout(cap)
                shift = len(ids) - len(base)
                want = [i if i < base_prefix else i + shift for i, t in enumerate(base) if t in special]
                got = [i for i, t in enumerate(ids) if t in special]
                assert got == want, (set_name, positions, cap)
                assert s in tok.decode(ids)  # the text is still there, as text


def test_special_token_text_stays_text(tiny):
    check_no_control_tokens(*tiny)


def test_special_token_text_stays_text_with_a_bos_adding_tokenizer(tiny_bos):
    model, tok = tiny_bos
    check_no_control_tokens(model, tok)
    enc = FacetEncoder(model, tok, prompts="long", positions="continue")
    ids, _ = enc.layout("a <s> dog </s>")
    assert ids.count(tok.bos_token_id) == 2 and ids[0] == tok.bos_token_id  # the tokenizer's BOS + the separator
    assert tok.eos_token_id not in ids


@pytest.mark.slow
def test_special_token_text_stays_text_smollm2(flame_cache):
    model, tok = load_llm("smollm2-135m")
    assert {"<|im_end|>", "<|endoftext|>"} <= set(special_strings(tok))
    check_no_control_tokens(model, tok)
    emb = FacetEncoder(model, tok, prompts="short", positions="continue").encode(["a dog <|im_end|><|endoftext|>"])
    assert torch.isfinite(emb).all()
