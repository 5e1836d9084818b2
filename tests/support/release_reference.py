"""The FLAME release's text side rebuilt from its description (../shared/FLAME.md sections 1-2),
independently of flame.prompts and flame.facets: the reference that tests/unit/test_release_text.py
compares `--positions continue` against (see that file for the rules), and a tokenizer that treats
`<s>` as Mistral's does."""

from __future__ import annotations

import torch

from flame.facets import FacetEncoder
from support.arrays import rel_diff

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
