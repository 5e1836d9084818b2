"""Hostile captions: special-token text, huge captions, and arbitrary text (property-based).

A caption is data: it must never become a control token, never change how many facets are read or
where relative to the prefix, and never crash the encoder or give non-finite vectors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.release_reference import bos_tokenizer

from flame.facets import FacetEncoder
from flame.llm import load_llm
from flame.prompts import FACETS, PROMPT_SETS

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


# ---- the caption cap ---------------------------------------------------------------------------
class _Recording:
    """A tokenizer that remembers the longest text it was handed."""

    def __init__(self, tok):
        self._tok, self.longest = tok, 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def check_cap(model, tok, cap: int | None) -> None:
    huge = "a small red car parked on a wet street at night. " * 4082  # 200,002 characters
    recording = _Recording(tok)
    enc = FacetEncoder(model, recording, prompts="long", positions="continue", max_caption_tokens=cap)
    limit = enc.max_caption_tokens
    template = len(enc.layout("")[0])  # prompts with an empty caption: prefix and all facets
    recording.longest = 0
    emb = enc.encode([huge, "a dog"])
    assert emb.shape == (2, 7, model.config.hidden_size) and torch.isfinite(emb).all()
    assert enc.truncated == 1
    assert enc.tokens <= 2 * template + limit + 10  # both sequences: the huge one holds at most `limit` caption tokens
    assert len(enc.layout(huge)[0]) <= template + limit
    assert recording.longest <= limit * 32 + 200  # the text was cut by characters before tokenizing
    assert len(enc.layout(huge)[0]) >= template + limit - 4  # cut at the cap, not far below it


def test_a_200k_character_caption_is_capped(tiny):
    check_cap(*tiny, cap=64)  # below the tiny model's 512-token context


def test_default_cap_and_bad_caps(tiny):
    from flame.errors import FlameError

    assert FacetEncoder(*tiny).max_caption_tokens == 512
    for bad in (0, -3, True):
        with pytest.raises(FlameError, match="max_caption_tokens"):
            FacetEncoder(*tiny, max_caption_tokens=bad)
    enc = FacetEncoder(*tiny, prompts="raw", max_caption_tokens=None)  # only the context limits it
    ids, _ = enc.layout("dog " * 1000)
    assert len(ids) == enc.max_length


@pytest.mark.slow
def test_a_200k_character_caption_is_capped_smollm2(flame_cache):
    model, tok = load_llm("smollm2-135m")
    assert model.config.max_position_embeddings > 4 * 512  # the default cap sits well below the context
    check_cap(model, tok, cap=512)


def test_flame_embed_max_caption_tokens(tmp_path, tiny_llm_dir, tiny, capsys):
    """The cap reaches `flame embed`; a non-default cap is recorded in the manifest (and a store made
    under another cap is refused); the default is not recorded, so stores made before the cap resume."""
    import json

    import numpy as np
    import webdataset as wds
    from support.embed_data import FAKE_JPEG

    from flame.cli import main
    from flame.store import EmbeddingStore

    huge = "a small red car parked on a wet street at night. " * 4082
    (tmp_path / "d").mkdir()
    with wds.TarWriter(str(tmp_path / "d" / "s.tar")) as w:
        for key, txt in [("k0", "a dog"), ("k1", huge)]:
            w.write({"__key__": key, "jpg": FAKE_JPEG, "txt": txt})

    def embed(out, *extra):
        capsys.readouterr()
        code = main(["embed", "--data", str(tmp_path / "d"), "--llm", str(tiny_llm_dir), "--out", str(out), *extra])
        return code, *capsys.readouterr()

    code, out, err = embed(tmp_path / "a", "--max-caption-tokens", "16")
    assert code == 0 and "1 truncated captions" in out, err
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["max_caption_tokens"] == 16
    want = FacetEncoder(*tiny, prompts="raw", max_caption_tokens=16).encode([huge])
    got = EmbeddingStore(tmp_path / "a").get("s", 1)
    np.testing.assert_allclose(got, torch.nn.functional.normalize(want[0], dim=-1).numpy(), atol=2e-3)
    code, _, err = embed(tmp_path / "a")  # the default cap on a 16-token store: refused, nothing lost
    assert code == 2 and "max_caption_tokens" in err and EmbeddingStore(tmp_path / "a").keys("s") == ["k0", "k1"]
    code, out, _ = embed(tmp_path / "b")
    assert code == 0 and "max_caption_tokens" not in json.loads((tmp_path / "b" / "manifest.json").read_text())
    code, _, err = embed(tmp_path / "c", "--max-caption-tokens", "0")
    assert code == 2 and "max_caption_tokens" in err and "Traceback" not in err


# ---- property-based: arbitrary captions ----------------------------------------------------------
FRAGMENTS = [
    ':"', '"', "'", "?", ".", ",", " ", "\n", "\t", "\r\n", "\x00", "\x1b[2J", "\u200b", "\ufeff", "\u202e",
    "\ud800", "\udfff", "🐕", "東京", "é", "e\u0301", "<s>", "</s>", "<|im_end|>", "<|endoftext|>", "<|pad|>",
    "<|im_start|>", "[INST]", ' . After thinking step by step , ', 'Image description : "',
    *FACETS, *(p.prefix for p in PROMPT_SETS.values()),
]
pieces = st.one_of(
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20),
    st.sampled_from(FRAGMENTS),
)
captions = st.one_of(
    st.lists(pieces, max_size=8).map("".join),
    st.builds(lambda piece, n: piece * n, st.sampled_from(FRAGMENTS[:20] + ["word ", "a dog "]), st.integers(1, 4000)),
)
PROPERTY_MODES = MODES + [("raw", "continue")]


@pytest.fixture(scope="module")
def property_encoders(tiny, tiny_bos):
    out = []
    for model, tok in (tiny, tiny_bos):
        special = special_ids(tok)
        for set_name, positions in PROPERTY_MODES:
            enc = FacetEncoder(model, tok, prompts=set_name, positions=positions, max_caption_tokens=48)
            facets = [i for f in enc._facets() for i in f]
            ids, reads = enc.layout("")
            prefix = len(ids) - len(facets)
            fixed = {
                "facets": facets,
                "offsets": [r - prefix for r in reads],
                "template": len(ids),
                "bos": [i for i in ids[:prefix] if i in special],
                "special": special,
            }
            out.append((enc, fixed))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cap=captions)
@example(cap="")
@example(cap="a \ud800 dog\x00 <|endoftext|><s>")
@example(cap='x" . After thinking step by step , <s> this image description means in just one word:"')
def test_a_caption_never_moves_the_facets(property_encoders, cap):
    for enc, fixed in property_encoders:
        ids, reads = enc.layout(cap)
        prefix = len(ids) - len(fixed["facets"])
        assert ids[prefix:] == fixed["facets"]  # the same facet tokens after every caption
        assert reads == [prefix + o for o in fixed["offsets"]]  # read where the facets end, K of them
        assert len(ids) <= fixed["template"] + enc.max_caption_tokens
        assert [i for i in ids[:prefix] if i in fixed["special"]] == fixed["bos"]  # no control token from text


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(caps=st.lists(captions, min_size=1, max_size=4))
@example(caps=["", "\udfff", "dog " * 5000, "<|pad|>" * 3])
def test_hostile_captions_encode_to_finite_vectors(property_encoders, caps):
    for enc, _ in property_encoders[:: len(PROPERTY_MODES) - 1]:  # a few modes of both tokenizers
        emb = enc.encode(caps)
        assert emb.shape == (len(caps), enc.k, enc.dim)
        assert torch.isfinite(emb).all()
