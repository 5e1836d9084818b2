"""Continue mode against the FLAME release's text side, rebuilt here from its description
(../shared/FLAME.md sections 1-2), independently of flame.prompts and flame.facets:

- the templated text is ONE string, `prefix(caption) , <s> F1 F2 ... FK` with single spaces (the raw
  set has no `<s>`), after the release's caption clean-up, stripped, and tokenized at once with the
  tokenizer adding its BOS where it does;
- facets are read at the last K occurrences of the text's final token (the `:"` that ends every
  facet); the prefix ends at the last occurrence of the `,` token, found as the release finds it;
- attention: causal over positions 0..T-1 of the packed sequence; every facet sees the prefix up to
  and including that `,` and its own tokens only (`<s> ` belongs to F1).
"""

from __future__ import annotations

import pytest
from support.arrays import rel_diff
from support.release_reference import (
    CAPTIONS,
    bos_tokenizer,
    check_hidden,
    check_token_ids,
    release_hidden,
    release_layout,
)

from flame.facets import FacetEncoder
from flame.llm import load_llm


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir):
    return load_llm(str(tiny_llm_dir))


@pytest.fixture(scope="module")
def tiny_bos(tiny_llm_dir):
    """The tiny model's weights with the Mistral-like tokenizer."""
    model, _ = load_llm(str(tiny_llm_dir))
    tok = bos_tokenizer()
    assert len(tok) <= model.config.vocab_size
    return model, tok


@pytest.fixture(scope="module")
def smollm2(flame_cache):
    return load_llm("smollm2-135m")


def test_token_ids_and_read_positions_equal_the_release(tiny):
    check_token_ids(*tiny)


def test_token_ids_equal_the_release_with_a_bos_adding_tokenizer(tiny_bos):
    model, tok = tiny_bos
    check_token_ids(model, tok)
    ids, _ = FacetEncoder(model, tok, prompts="long", positions="continue").layout("a dog")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 2  # BOS, and the release's `<s>`


def test_raw_set_restart_equals_the_release(tiny):
    enc = FacetEncoder(*tiny, prompts="raw", positions="restart")
    for cap in CAPTIONS:
        ids, reads, _ = release_layout(tiny[1], cap, "raw")
        assert enc.layout(cap) == (ids, reads)


def test_continue_mode_hidden_states_equal_the_release_rule(tiny):
    check_hidden(*tiny, layer=2, captions=CAPTIONS, tol=1e-4)


def test_continue_mode_equals_the_release_rule_with_a_bos_adding_tokenizer(tiny_bos):
    check_hidden(*tiny_bos, layer=2, captions=CAPTIONS, tol=1e-4)


def test_restart_mode_is_not_the_release_rule(tiny):
    """The reference above is sensitive: the other position rule fails it."""
    model, tok = tiny
    enc = FacetEncoder(model, tok, prompts="long", layer=2, positions="restart")
    cap = CAPTIONS[0]
    want = release_hidden(model, *release_layout(tok, cap, "long"), 2)
    assert rel_diff(enc.encode([cap])[0], want) > 1e-2


@pytest.mark.slow
def test_token_ids_equal_the_release_smollm2(smollm2):
    check_token_ids(*smollm2)


@pytest.mark.slow
def test_continue_mode_equals_the_release_rule_smollm2(smollm2):
    model, tok = smollm2
    check_hidden(model, tok, layer=29, captions=CAPTIONS[:6], tol=1e-4)
