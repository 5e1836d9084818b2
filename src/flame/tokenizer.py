"""open_clip's tokenizer idiom for a FLAME model: `tokenizer(texts)` -> something `encode_text` takes.

A FLAME model has no token ids of its own: its text side is a frozen LLM that reads each text
inside a prompt set's template (FLAME.md section 1), and `FlameModel.encode_text` does that
(with its disk cache). So "tokenising" here keeps the texts and the prompt set they are to be
read with, and `.to(device)` (which open_clip and CLIP_benchmark code call on token tensors)
records where `encode_text` puts the vectors. The default prompt set is "raw", the one FLAME.md
section 6 prescribes for short text and class prompts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from flame.errors import FlameError

DEFAULT_PROMPTS = "raw"


@dataclass(frozen=True)
class TextBatch:
    """Texts plus the prompt set and device `FlameModel.encode_text` uses for them."""

    texts: tuple[str, ...]
    prompts: object = DEFAULT_PROMPTS  # a prompt-set name, a file path, or a flame.prompts.PromptSet
    device: torch.device | None = None

    def to(self, device) -> TextBatch:
        return TextBatch(self.texts, self.prompts, torch.device(device))

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)

    def __getitem__(self, i):
        return self.texts[i]


class FlameTokenizer:
    """`tokenizer(texts)` -> TextBatch. `prompts` is the prompt set its batches carry."""

    def __init__(self, prompts=DEFAULT_PROMPTS):
        self.prompts = prompts

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> TextBatch:
        """`context_length` is accepted for open_clip's signature and ignored: the LLM reads the
        whole text up to the model's caption cap (`max_caption_tokens`)."""
        del context_length
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise FlameError("the tokenizer takes a string or a list of strings")
        return TextBatch(tuple(texts), self.prompts)

    def __repr__(self) -> str:
        return f"FlameTokenizer(prompts={self.prompts!r})"
