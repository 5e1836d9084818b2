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
import torch

from flame.facets import FacetEncoder
from flame.llm import load_llm

ONE_WORD = ' means in just one word:"'
FACET_SUBJECTS = (
    "this image description",
    "the category of the main object in this image",
    "the prominent characteristic or pattern of the main object in this image",
    "the category of the minor object in this image",
    "the prominent characteristic or pattern of the minor object in this image",
    "the primary action or event taking place in this image",
    "the overall atmosphere or emotion of this image",
)
SETS = {  # name -> (lead words, separator before F1, number of facets)
    "raw": ("Image description", "", 1),
    "short": ("Image description", "<s> ", 3),
    "long": ("Detailed Image description", "<s> ", 7),
}
CAPTIONS = [
    "a dog running on the beach",
    'He said "look at the sky" to the child',
    "is this a red car?",
    "the dogs' ball'",
    "ends with a quote\"",
    "Ein Hund läuft über die Straße, 東京 café naïve привет 🐕",
    'a sign that reads word:"stop" here',
    'the text :" the and : " the again',
    "this image description means in just one word:\" dog",
    "a dog , a cat , a bird .",
    "two sentences. a second one?",
    "",
]


def release_text(caption: str, set_name: str) -> str:
    """The release's templated string for one caption."""
    words, sep, k = SETS[set_name]
    s = caption
    if len(s) > 0 and s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    if len(s) > 0 and s[-1] == "?":
        s = s[:-1] + "."
    facets = " ".join(subject + ONE_WORD for subject in FACET_SUBJECTS[:k])
    return f'{words} : "{s}" . After thinking step by step , {sep}{facets}'.strip()


def release_layout(tokenizer, caption: str, set_name: str) -> tuple[list[int], list[int], int]:
    """-> (token ids, read positions, index of the prefix's final `,`) as the release finds them."""
    ids = tokenizer(release_text(caption, set_name))["input_ids"]
    k = SETS[set_name][2]
    probe = tokenizer('After thinking step by step , this image description means in just one word:"')["input_ids"]
    comma = probe[-10]
    assert tokenizer.decode([comma]).strip() == ","
    first_sep = max(i for i, t in enumerate(ids) if t == comma)
    if k == 1:
        return ids, [len(ids) - 1], first_sep
    quotes = [i for i, t in enumerate(ids) if t == ids[-1]][-k:]
    assert len(quotes) == k
    return ids, quotes, first_sep


@torch.no_grad()
def release_hidden(model, ids: list[int], reads: list[int], first_sep: int, layer: int) -> torch.Tensor:
    """Hidden states (block `layer`'s output) at the read positions under the release's mask rule."""
    T = len(ids)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(1, len(reads)):
        allowed[reads[i - 1] + 1 : reads[i] + 1, first_sep + 1 : reads[i - 1] + 1] = False
    mask = torch.zeros(1, 1, T, T, dtype=model.dtype).masked_fill(~allowed, torch.finfo(model.dtype).min)
    out = model(
        input_ids=torch.tensor([ids]),
        attention_mask=mask,
        position_ids=torch.arange(T)[None],
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[layer][0, reads].float()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_token_ids(model, tokenizer, captions=CAPTIONS) -> None:
    for set_name in SETS:
        enc = FacetEncoder(model, tokenizer, prompts=set_name, positions="continue")
        facet_tokens = sum(map(len, enc._facets()))
        for cap in captions:
            want_ids, want_reads, first_sep = release_layout(tokenizer, cap, set_name)
            ids, reads = enc.layout(cap)
            assert ids == want_ids, (set_name, cap)
            assert reads == want_reads, (set_name, cap)
            assert len(ids) - facet_tokens == first_sep + 1, (set_name, cap)  # the prefix ends at the `,`


def check_hidden(model, tokenizer, layer: int, captions, tol: float) -> dict[str, float]:
    worst = {}
    for set_name in SETS:
        enc = FacetEncoder(model, tokenizer, prompts=set_name, layer=layer, positions="continue")
        got = enc.encode(captions)
        want = torch.stack(
            [release_hidden(model, *release_layout(tokenizer, c, set_name), layer) for c in captions]
        )
        worst[set_name] = rel_diff(got, want)
    assert all(v <= tol for v in worst.values()), worst
    return worst


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir):
    return load_llm(str(tiny_llm_dir))


def bos_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer that behaves like Mistral's here: it adds `<s>` as BOS, and `<s>`
    written in text is that control token (so the release's separator is a second BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from flame.llm import prepare_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([release_text(c, s) for c in CAPTIONS for s in SETS] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return prepare_tokenizer(fast)


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
