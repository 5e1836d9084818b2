"""FLAME: frozen LLMs as multi-facet text encoders for language-image pre-training.

The public API is imported lazily so `import flame` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FlameError": "flame.errors",
    "load_llm": "flame.llm",
    "PROMPT_SETS": "flame.prompts",
    "PromptSet": "flame.prompts",
    "load_prompt_set": "flame.prompts",
    "FacetEncoder": "flame.facets",
    "EmbeddingStore": "flame.store",
    "MultiPositiveSigmoidLoss": "flame.loss",
    "FlameModel": "flame.model",
    "TextEncoder": "flame.textenc",
    "create_model": "flame.factory",
    "create_model_and_transforms": "flame.factory",
    "create_model_from_pretrained": "flame.factory",
    "get_tokenizer": "flame.factory",
    "FlameTokenizer": "flame.tokenizer",
    "TextBatch": "flame.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flame' has no attribute {name!r}")
