"""The packed facet-decoupled pass against an independent reference: one plain causal
forward per (caption, facet) sequence, unpadded, with HF's own masks and positions."""

from __future__ import annotations

import pytest
import torch
from support.arrays import rel_diff

from flame.errors import FlameError
from flame.facets import FacetEncoder
from flame.llm import load_llm
from flame.prompts import clean_caption

LONG = "a small red car parked on a wet street at night beside an old stone house with green windows " * 12
CAPTIONS = [
    "",
    "dog",
    LONG[:600],  # 200+ tokens
    LONG * 3,  # longer than the tiny model's context
    "Ein Hund läuft über die Straße 東京 café naïve привет",
    'He said "look at the sky" to the child?',
]


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir):
    return load_llm(str(tiny_llm_dir))


def reference(encoder: FacetEncoder, captions: list[str], positions: str = "restart") -> torch.Tensor:
    """K separate passes. Restart: each facet sequence is prefix + facet, positions 0..n-1.
    Continue: facet k keeps the positions it has in the packed sequence."""
    model, out = encoder.model, []
    (layer,) = encoder.layer
    for cap in captions:
        prefix, _ = encoder._prefix(clean_caption(cap))
        facets, offset, rows = encoder._facets(), len(prefix), []
        for f in facets:
            ids = torch.tensor([prefix + f])
            pos = torch.arange(ids.shape[1])
            if positions == "continue":
                pos[len(prefix) :] = torch.arange(offset, offset + len(f))
            offset += len(f)
            with torch.no_grad():
                hs = model(input_ids=ids, position_ids=pos[None], output_hidden_states=True).hidden_states
            rows.append(hs[layer][0, -1])  # hidden_states[i] is block i's output (i < L: before the norm)
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_separate_passes(tiny_llm_dir, attn):
    model, tok = load_llm(str(tiny_llm_dir), attn_implementation=attn)
    enc = FacetEncoder(model, tok, prompts="long", layer=-2)
    got = enc.encode(CAPTIONS)
    assert got.shape == (len(CAPTIONS), 7, model.config.hidden_size)
    assert enc.truncated == 1
    assert rel_diff(got, reference(enc, CAPTIONS)) <= 1e-4


def test_continue_positions_match_their_reference(tiny):
    enc = FacetEncoder(*tiny, prompts="short", layer=2, positions="continue")
    got = enc.encode(CAPTIONS[:3])
    assert rel_diff(got, reference(enc, CAPTIONS[:3], positions="continue")) <= 1e-4
    # The literal <s> separator belongs to the first facet only, and continue differs from restart.
    sep = enc._ids(enc.prompts.sep)
    first, second = enc._facets()[0], enc._facets()[1]
    assert any(first[i : i + len(sep)] == sep for i in range(len(first)))
    assert not any(second[i : i + len(sep)] == sep for i in range(len(second)))
    restart = FacetEncoder(*tiny, prompts="short", layer=2).encode(CAPTIONS[:3])
    assert rel_diff(got[:, 1:], restart[:, 1:]) > 1e-3


def test_batch_independence(tiny):
    enc = FacetEncoder(*tiny, prompts="long", max_batch=3)
    alone = enc.encode([CAPTIONS[4]])[0]
    for batch in (CAPTIONS, CAPTIONS[::-1], [CAPTIONS[4]] + ["x " * n for n in range(1, 40, 3)]):
        together = enc.encode(batch)[batch.index(CAPTIONS[4])]
        assert rel_diff(together, alone) <= 1e-4


def test_facets_are_separate(tiny):
    emb = FacetEncoder(*tiny, prompts="long").encode(["a dog running on the beach"])[0]
    spread = (emb - emb.mean(0)).norm(dim=-1) / emb.norm(dim=-1)
    assert spread.min() > 1e-3, "every facet must differ from the facets' mean"
    assert torch.cdist(emb, emb).fill_diagonal_(float("inf")).min() > 1e-3 * emb.norm(dim=-1).max()


def test_prefix_tokenizes_as_the_natural_text(tiny):
    enc = FacetEncoder(*tiny, prompts="raw")
    cap = clean_caption("two dogs")
    prefix, cut = enc._prefix(cap)
    text = enc.prompts.prefix.format(cap=cap) + enc.prompts.facets[0]
    assert not cut
    assert prefix + enc._facets()[0] == enc._ids(text, special=True)


def test_truncation_cuts_the_caption_never_the_prompts(tiny):
    enc = FacetEncoder(*tiny, prompts="long")
    prefix, cut = enc._prefix(clean_caption(LONG * 3))
    assert cut and len(prefix) + max(map(len, enc._facets())) <= enc.max_length
    tail = enc._ids(enc._after)
    assert prefix[-len(tail) :] == tail  # the text after the caption survives


def test_duplicates_are_computed_once_and_returned_in_order(tiny):
    enc = FacetEncoder(*tiny, prompts="raw")
    out = enc.encode(["cat", "dog", "cat"])
    tokens_with_repeat = enc.tokens
    single = enc.encode(["cat", "dog"])
    assert torch.equal(out[0], out[2]) and torch.equal(out[:2], single)
    assert enc.tokens == 2 * tokens_with_repeat


def test_layer_mean_and_indices(tiny):
    one = FacetEncoder(*tiny, prompts="raw", layer=1).encode(["a cat"])
    top = FacetEncoder(*tiny, prompts="raw", layer=-2).encode(["a cat"])
    two = FacetEncoder(*tiny, prompts="raw", layer=2).encode(["a cat"])
    mean = FacetEncoder(*tiny, prompts="raw", layer=[1, 2]).encode(["a cat"])
    assert torch.allclose(top, two)  # 3 blocks: -2 is block 2
    assert torch.allclose(mean, (one + two) / 2, atol=1e-6)
    for bad in (0, 4, -4, []):
        with pytest.raises(FlameError, match="layer"):
            FacetEncoder(*tiny, layer=bad)


def test_empty_input(tiny):
    enc = FacetEncoder(*tiny, prompts="short")
    assert enc.encode([]).shape == (0, 3, tiny[0].config.hidden_size)


@pytest.mark.slow
def test_packed_equals_separate_passes_smollm2(flame_cache):
    model, tok = load_llm("smollm2-135m")
    enc = FacetEncoder(model, tok, prompts="long", layer=-2)
    assert rel_diff(enc.encode(CAPTIONS), reference(enc, CAPTIONS)) <= 1e-4


def test_causal_positions_are_one_plain_sequence_where_later_facets_see_earlier_ones(tiny):
    """`positions="causal"` (the decoupled-attention ablation of `flame study`) equals one ordinary
    forward of prefix + F1 ... FK, read at each facet's last token; its first facet is continue's."""
    enc = FacetEncoder(*tiny, prompts="short", layer=2, positions="causal")
    got = enc.encode(CAPTIONS[:3])
    (layer,) = enc.layer
    for row, cap in zip(got, CAPTIONS[:3]):
        prefix, _ = enc._prefix(clean_caption(cap))
        ids = prefix + [i for f in enc._facets() for i in f]
        ends = torch.tensor([len(f) for f in enc._facets()]).cumsum(0) + len(prefix) - 1
        with torch.no_grad():
            hs = enc.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        assert rel_diff(row, hs[layer][0, ends]) <= 1e-4
    cont = FacetEncoder(*tiny, prompts="short", layer=2, positions="continue").encode(CAPTIONS[:3])
    assert rel_diff(got[:, 0], cont[:, 0]) <= 1e-4 and rel_diff(got[:, 1:], cont[:, 1:]) > 1e-3
