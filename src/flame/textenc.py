"""The text side at inference: captions -> L2-normalised vectors in a trained model's image space.

A trained model records how its text embeddings were made (the "text" block of its
config.json, copied from the store manifest): the LLM spec and weight fingerprint, the
decoder layer(s), the position scheme and the prompt sets with their exact texts.
`TextEncoder` reproduces that: it loads the LLM lazily, only when a text is not yet in the
disk cache, and refuses an LLM whose fingerprint differs from the recorded one unless forced.

Output (FLAME.md section 6): for a K-facet prompt set the mean of the K unnormalised facet
vectors, then L2 norm; for the raw set the single facet, normalised.

Disk cache, one folder per *text space* (LLM identity, layer, positions, prompt texts):

    CACHE/text/SPACEKEY/space.json          what the key stands for (for people, not read back)
    CACHE/text/SPACEKEY/index.sqlite        caption key (sha256) -> (chunk, row), and per chunk
                                            its rows, width and sha256 digest
    CACHE/text/SPACEKEY/NAME.npy            float16 [n, D] vectors of one written chunk
    CACHE/text/SPACEKEY/NAME.keys.json      the n captions, in row order (ASCII JSON)

The LLM identity is its recorded fingerprint, or (no fingerprint recorded, or an LLM forced)
the content key of the weights on disk (`flame.llm.weights_key`). Chunks are append-only,
uniquely named, written atomically (temporary name + rename) and then registered in the index
in one transaction: the first registered entry of a caption is served, files the index does
not name are never read, so any number of readers and writers may share a cache (on a local
or lock-honouring file system: sqlite's locks). A process looks up only the captions it is
given and maps at most OPEN_ARRAYS chunk files at once. A chunk is checked when read (digest,
dtype, width, finite values); a damaged one is unregistered and its texts recomputed. Vectors
are returned exactly as stored (re-normalised after float16), so a first and a repeated
evaluation give identical numbers.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from flame.errors import FlameError
from flame.prompts import DEFAULT_MAX_CAPTION_TOKENS, PROMPT_SETS, PromptSet, load_prompt_set
from flame.store.textcache import CACHE_VERSION, DamagedChunk, TextCache

_Space = TextCache  # the name tests and older callers use

log = logging.getLogger(__name__)

CHUNK = 512  # captions encoded (and written to the cache) per step: a killed job keeps its finished chunks


def default_cache_dir() -> Path:
    from flame.llm import cache_dir

    return cache_dir() / "text"


def _layers(value) -> list[int]:
    if value is None:
        return [-2]
    return [int(value)] if isinstance(value, int | float | str) else [int(v) for v in value]


class TextEncoder:
    """Texts -> float32 [N, D] L2-normalised vectors, exactly as the model's text side defines them.

    `text` is a model config's "text" block (or `flame.model.text_side(store.manifest)`).
    `llm` overrides the recorded LLM spec (e.g. a local copy); `device` is where it runs;
    `force` accepts an LLM whose weight fingerprint differs from the recorded one."""

    def __init__(
        self,
        text: dict,
        cache_dir: str | Path | None = None,
        device: str | None = None,
        llm: str | None = None,
        force: bool = False,
    ):
        self.text = dict(text or {})
        llm_info = self.text.get("llm") or {}
        self.spec = llm or llm_info.get("spec")
        if not self.spec:
            raise FlameError("the model's text side records no LLM; pass llm=... (--llm) to choose one")
        self.recorded_fingerprint: str | None = llm_info.get("fingerprint") or None
        self.layer = _layers(self.text.get("layer"))
        self.positions = self.text.get("positions", "restart")
        # A store made with another caption cap recorded it; the default (512) is not recorded.
        self.max_caption_tokens = int(self.text.get("max_caption_tokens", DEFAULT_MAX_CAPTION_TOKENS))
        self.device = device
        self.force = force
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.llm_given = llm is not None  # a spec read from the model folder is never downloaded
        self._identity: str | None = None
        self._llm = None  # (model, tokenizer) while loaded
        self._encoders: dict[str, object] = {}
        self._spaces: dict[str, TextCache] = {}
        self.loads = 0  # how many times an LLM was loaded by this encoder

    @property
    def identity(self) -> str:
        """The LLM's identity in cache keys: the recorded fingerprint when no LLM is forced (the
        LLM loaded is checked against it); else (forced, with or without --llm, or no fingerprint
        recorded) the content key of the weights the spec names (`flame.llm.weights_key`), so
        other or replaced weights never share vectors. A hub id not cached yet is loaded first."""
        if self._identity is None:
            if self.recorded_fingerprint and not self.force:
                self._identity = f"fingerprint:{self.recorded_fingerprint}"
            else:
                from flame.llm import weights_key

                key = weights_key(self.spec)
                if key is None:
                    self._load()  # a hub id: downloads only when the user named it (llm_given)
                    key = weights_key(self.spec)
                if key is None:
                    raise FlameError(f"cannot identify the weights of LLM {self.spec!r} on this machine")
                self._identity = f"weights:{key}"
        return self._identity

    # ---- prompt sets ---------------------------------------------------------------------
    def prompt_set(self, prompts: str | PromptSet) -> PromptSet:
        """A name resolves to the recorded prompt set of that name (its exact texts), else the
        built-in set; a PromptSet or a YAML/JSON file path is used as given."""
        if isinstance(prompts, PromptSet):
            return prompts
        for d in self.text.get("prompt_sets") or []:
            if isinstance(d, dict) and d.get("name") == prompts and d.get("prefix") and d.get("facets"):
                return PromptSet(str(prompts), d["prefix"], tuple(d["facets"]), str(d.get("sep", "")))
        if prompts in PROMPT_SETS:
            return PROMPT_SETS[prompts]
        return load_prompt_set(prompts)

    def space_description(self, prompts: str | PromptSet, context_length: int | None = None) -> dict:
        ps = self.prompt_set(prompts)
        return {
            "version": CACHE_VERSION,
            "llm": self.identity,
            "layer": self.layer,
            "positions": self.positions,
            "prefix": ps.prefix,
            "facets": list(ps.facets),
            "sep": ps.sep,
            **({"max_caption_tokens": self.max_caption_tokens}
               if self.max_caption_tokens != DEFAULT_MAX_CAPTION_TOKENS and context_length is None else {}),
            **({"context_length": int(context_length)} if context_length is not None else {}),
        }

    def _space(self, prompts: str | PromptSet, context_length: int | None = None) -> TextCache:
        desc = self.space_description(prompts, context_length)
        blob = json.dumps(desc, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
        key = hashlib.sha256(blob).hexdigest()[:20]
        if key not in self._spaces:
            dim = self.text.get("dim")
            self._spaces[key] = TextCache(self.cache_dir / key, desc, int(dim) if dim else None)
        return self._spaces[key]

    # ---- the LLM -------------------------------------------------------------------------
    @property
    def llm_loaded(self) -> bool:
        return self._llm is not None

    def _load(self):
        if self._llm is None:
            from flame.llm import legacy_llm_fingerprint, llm_fingerprint, load_llm

            model, tokenizer = load_llm(self.spec, device=self.device, allow_download=self.llm_given)
            self.loads += 1
            if self.recorded_fingerprint:
                found = llm_fingerprint(model)
                # models trained on stores stamped before the fingerprint became dtype-independent
                same = found == self.recorded_fingerprint or legacy_llm_fingerprint(model) == self.recorded_fingerprint
                if not same and not self.force:
                    del model, tokenizer
                    gc.collect()
                    raise FlameError(
                        f"LLM {self.spec!r} has weight fingerprint {found}, but the model was trained with "
                        f"{self.recorded_fingerprint}; use the same LLM, or force it (--force-llm / force_llm=True)"
                    )
            dim = self.text.get("dim")
            if dim and model.config.hidden_size != int(dim):
                hidden = model.config.hidden_size
                del model, tokenizer
                gc.collect()
                raise FlameError(
                    f"LLM {self.spec!r} has hidden size {hidden}, but the model's text side has D={dim}: "
                    "its vectors cannot live in this image space"
                )
            self._llm = (model, tokenizer)
        return self._llm

    def unload(self) -> None:
        """Free the LLM (and its per-prompt-set encoders); the next miss loads it again."""
        self._encoders.clear()
        if self._llm is not None:
            self._llm = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _encoder(self, ps: PromptSet, context_length: int | None = None):
        from flame.facets import FacetEncoder

        key = json.dumps([ps.prefix, list(ps.facets), ps.sep, context_length])
        if key not in self._encoders:
            model, tokenizer = self._load()
            cap = self.max_caption_tokens
            if context_length is not None:  # the release's first pass: its special tokens count
                cap = max(1, int(context_length) - len(tokenizer("", add_special_tokens=True)["input_ids"]))
            self._encoders[key] = FacetEncoder(model, tokenizer, prompts=ps, layer=self.layer,
                                               positions=self.positions, max_caption_tokens=cap)
        return self._encoders[key]

    # ---- encoding ------------------------------------------------------------------------
    def missing(self, texts: Sequence[str], prompts: str | PromptSet = "raw",
                context_length: int | None = None) -> list[str]:
        """The distinct texts not yet in the cache, in first-seen order (never loads the LLM)."""
        return self._space(prompts, context_length).missing(list(texts))

    def count_truncated(self, texts: Sequence[str], prompts: str | PromptSet = "raw",
                        context_length: int | None = None) -> int:
        """How many of the distinct `texts` the encoder cuts (caption cap or context), cached or not,
        so that an evaluation reports it every time. A text of at most half the cap in UTF-8 bytes
        is never cut (a byte-level tokenizer gives at most one token per byte, and the other half
        leaves room for the prompt within any context of at least the cap) and is not tokenized;
        only when a longer one is there is the LLM (and its tokenizer) loaded."""
        bound = (context_length or self.max_caption_tokens) // 2
        long = [t for t in dict.fromkeys(texts) if len(t.encode("utf-8", "surrogatepass")) > bound]
        if not long:
            return 0
        encoder = self._encoder(self.prompt_set(prompts), context_length)
        return sum(encoder.shortened(t) for t in long)

    def encode(self, texts: Sequence[str], prompts: str | PromptSet = "raw", progress: bool = False,
               context_length: int | None = None) -> torch.Tensor:
        """float32 [N, D], L2-normalised; cached texts never load the LLM.

        `context_length`: cap each caption as the release's first tokenisation does, at this many
        tokens of the caption's own tokenisation with the tokenizer's special tokens (BOS) counted
        (the release's scripts 1024, CLIP_benchmark 512), instead of the model's
        `max_caption_tokens`; its vectors live in their own cache space."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise FlameError("encode_text takes a list of strings")
        ps = self.prompt_set(prompts)
        space = self._space(ps, context_length)
        forgotten: set[str] = set()
        while True:
            try:
                return self._encode(texts, ps, space, progress, context_length)
            except DamagedChunk as e:  # recompute that chunk's texts (its file is left as it is)
                if e.chunk in forgotten:
                    raise
                log.warning("%s: recomputing its texts", e)
                forgotten.add(e.chunk)
                space.forget(e.chunk)

    def _encode(self, texts: list[str], ps: PromptSet, space: TextCache, progress: bool,
                context_length: int | None = None) -> torch.Tensor:
        todo = space.missing(texts)
        if todo:
            encoder = self._encoder(ps, context_length)
            bar = None
            if progress:
                from flame.progress import progress as progress_

                bar = progress_(total=len(todo), unit="text", desc=f"encode text ({ps.name}, {ps.k} facets)")
            for start in range(0, len(todo), CHUNK):
                part = todo[start : start + CHUNK]
                facets = encoder.encode(part)  # [n, K, D] unnormalised
                vectors = F.normalize(facets.float().mean(dim=1), dim=-1)
                bad = (~torch.isfinite(vectors).all(dim=1)).nonzero()
                if len(bad):
                    raise FlameError(f"the LLM gave a vector that is not finite for text {part[int(bad[0])]!r} "
                                     f"(not cached; try another --llm-dtype/device)")
                space.add(part, vectors.numpy())
                if bar is not None:
                    bar.update(len(part))
            if bar is not None:
                bar.close()
        if not texts:
            return torch.empty(0, int(self.text.get("dim") or 0))
        return F.normalize(torch.from_numpy(space.get(texts)), dim=-1)
