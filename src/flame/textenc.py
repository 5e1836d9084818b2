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
    CACHE/text/SPACEKEY/NAME.npy            float16 [n, D] vectors of one written chunk
    CACHE/text/SPACEKEY/NAME.keys.json      the n captions, in row order (written last: marks
                                            the chunk complete)

Chunks are append-only, uniquely named and written atomically (temporary name + rename), so
any number of readers and writers may share a cache. Vectors are returned exactly as stored
(re-normalised after float16), so a first and a repeated evaluation give identical numbers.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flame.errors import FlameError
from flame.fileio import write_atomic
from flame.prompts import DEFAULT_MAX_CAPTION_TOKENS, PROMPT_SETS, PromptSet, load_prompt_set

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_DTYPE = np.float16
CHUNK = 512  # captions encoded (and written to the cache) per step: a killed job keeps its finished chunks
COMPACT_AT = 64  # merge a space's chunks into one when more than this many exist


def default_cache_dir() -> Path:
    from flame.llm import cache_dir

    return cache_dir() / "text"


def _layers(value) -> list[int]:
    if value is None:
        return [-2]
    return [int(value)] if isinstance(value, int | float | str) else [int(v) for v in value]


class _Space:
    """The cached vectors of one text space: an in-memory caption -> (chunk, row) index over
    memory-mapped chunk files, refreshed from disk when a lookup misses."""

    def __init__(self, folder: Path, description: dict):
        self.folder = folder
        self.description = description
        self.index: dict[str, tuple[str, int]] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.seen: dict[str, int] = {}  # complete chunks indexed so far -> their row count

    def refresh(self) -> None:
        if not self.folder.is_dir():
            return
        for keys_file in sorted(self.folder.glob("*.keys.json")):
            name = keys_file.name[: -len(".keys.json")]
            if name in self.seen or not (self.folder / f"{name}.npy").is_file():
                continue
            try:
                keys = json.loads(keys_file.read_text())
            except (OSError, ValueError):
                continue  # removed by a compaction between glob and read
            self.seen[name] = len(keys)
            for row, caption in enumerate(keys):
                self.index.setdefault(caption, (name, row))

    def _array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            path = self.folder / f"{name}.npy"
            try:
                arr = np.load(path, mmap_mode="r")
                ok = arr.ndim == 2 and arr.shape[0] == self.seen.get(name, arr.shape[0])
            except ValueError:
                ok = False
            if not ok:
                raise FlameError(f"text cache chunk {path} is damaged; delete it and {name}.keys.json to recompute")
            self.arrays[name] = arr
        return self.arrays[name]

    def missing(self, captions: Sequence[str]) -> list[str]:
        unique = list(dict.fromkeys(captions))
        if any(c not in self.index for c in unique):
            self.refresh()
        return [c for c in unique if c not in self.index]

    def get(self, captions: Sequence[str], retry: bool = True) -> np.ndarray:
        """float32 [n, D] for captions that are all in the index."""
        rows_by_chunk: dict[str, list[tuple[int, int]]] = {}
        for i, c in enumerate(captions):
            name, row = self.index[c]
            rows_by_chunk.setdefault(name, []).append((i, row))
        out = None
        for name, pairs in rows_by_chunk.items():
            try:
                arr = self._array(name)
            except FileNotFoundError:  # compacted away by another process: rebuild the index once
                if not retry:
                    raise
                self.index.clear()
                self.seen.clear()
                self.arrays.clear()
                self.refresh()
                return self.get(captions, retry=False)
            idx = np.array([r for _, r in pairs])
            order = np.argsort(idx, kind="stable")
            vals = np.asarray(arr[idx[order]], dtype=np.float32)
            if out is None:
                out = np.empty((len(captions), arr.shape[1]), dtype=np.float32)
            out[np.array([pairs[j][0] for j in order])] = vals
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def add(self, captions: list[str], vectors: np.ndarray) -> None:
        """Write one chunk (atomically: array first, keys last) and index it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "space.json").is_file():
            try:
                write_atomic(self.folder / "space.json", json.dumps(self.description, indent=2, ensure_ascii=False))
            except FileNotFoundError:  # another process wrote it at the same moment (same temporary name)
                pass
        name = f"chunk-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._write(name, captions, vectors)
        self.seen[name] = len(captions)
        for row, c in enumerate(captions):
            self.index.setdefault(c, (name, row))
        if sum(n < CHUNK for n in self.seen.values()) > COMPACT_AT:
            self.compact()

    def _write(self, name: str, captions: list[str], vectors: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(vectors, dtype=CACHE_DTYPE))
        write_atomic(self.folder / f"{name}.npy", buf.getvalue())
        write_atomic(self.folder / f"{name}.keys.json", json.dumps(captions, ensure_ascii=False))

    def compact(self) -> None:
        """Merge the small chunks (many short calls leave many) into one; full chunks stay.
        Old chunks are removed after the merged one is complete. A reader holding an old
        chunk's memory map keeps reading it (POSIX unlink semantics); one that had not opened
        it yet rebuilds its index (see `get`)."""
        self.refresh()
        small = {n for n, rows in self.seen.items() if rows < CHUNK}
        captions = [c for c, (n, _) in self.index.items() if n in small]
        if len(small) < 2 or not captions:
            return
        try:
            vectors = self.get(captions)
        except (FileNotFoundError, KeyError):  # another process is compacting the same chunks
            return
        name = f"merged-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._write(name, captions, vectors)
        for o in small:
            (self.folder / f"{o}.keys.json").unlink(missing_ok=True)
            (self.folder / f"{o}.npy").unlink(missing_ok=True)
            self.seen.pop(o, None)
            self.arrays.pop(o, None)
        self.seen[name] = len(captions)
        self.index.update({c: (name, row) for row, c in enumerate(captions)})


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
        # The LLM's identity in cache keys: the recorded fingerprint (a matching LLM is checked on
        # load), else the spec. A forced override may be other weights, so it is keyed by its spec.
        if self.recorded_fingerprint and not (force and llm):
            self.identity = f"fingerprint:{self.recorded_fingerprint}"
        else:
            self.identity = f"spec:{self.spec}"
        self._llm = None  # (model, tokenizer) while loaded
        self._encoders: dict[str, object] = {}
        self._spaces: dict[str, _Space] = {}
        self.loads = 0  # how many times an LLM was loaded by this encoder

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

    def space_description(self, prompts: str | PromptSet) -> dict:
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
               if self.max_caption_tokens != DEFAULT_MAX_CAPTION_TOKENS else {}),
        }

    def _space(self, prompts: str | PromptSet) -> _Space:
        desc = self.space_description(prompts)
        key = hashlib.sha256(json.dumps(desc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]
        if key not in self._spaces:
            space = _Space(self.cache_dir / key, desc)
            space.refresh()
            self._spaces[key] = space
        return self._spaces[key]

    # ---- the LLM -------------------------------------------------------------------------
    @property
    def llm_loaded(self) -> bool:
        return self._llm is not None

    def _load(self):
        if self._llm is None:
            from flame.llm import legacy_llm_fingerprint, llm_fingerprint, load_llm

            model, tokenizer = load_llm(self.spec, device=self.device)
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

    def _encoder(self, ps: PromptSet):
        from flame.facets import FacetEncoder

        key = json.dumps([ps.prefix, list(ps.facets), ps.sep])
        if key not in self._encoders:
            model, tokenizer = self._load()
            self._encoders[key] = FacetEncoder(model, tokenizer, prompts=ps, layer=self.layer,
                                               positions=self.positions,
                                               max_caption_tokens=self.max_caption_tokens)
        return self._encoders[key]

    # ---- encoding ------------------------------------------------------------------------
    def missing(self, texts: Sequence[str], prompts: str | PromptSet = "raw") -> list[str]:
        """The distinct texts not yet in the cache, in first-seen order (never loads the LLM)."""
        return self._space(prompts).missing(list(texts))

    def encode(self, texts: Sequence[str], prompts: str | PromptSet = "raw", progress: bool = False) -> torch.Tensor:
        """float32 [N, D], L2-normalised; cached texts never load the LLM."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise FlameError("encode_text takes a list of strings")
        ps = self.prompt_set(prompts)
        space = self._space(ps)
        todo = space.missing(texts)
        if todo:
            encoder = self._encoder(ps)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(todo), unit="text", desc=f"encode text ({ps.name}, {ps.k} facets)",
                           disable=None, dynamic_ncols=True)
            for start in range(0, len(todo), CHUNK):
                part = todo[start : start + CHUNK]
                facets = encoder.encode(part)  # [n, K, D] unnormalised
                vectors = F.normalize(facets.float().mean(dim=1), dim=-1)
                space.add(part, vectors.numpy())
                if bar is not None:
                    bar.update(len(part))
            if bar is not None:
                bar.close()
        if not texts:
            return torch.empty(0, int(self.text.get("dim") or 0))
        return F.normalize(torch.from_numpy(space.get(texts)), dim=-1)
