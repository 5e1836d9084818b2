"""FacetEncoder: one packed forward pass per caption answers all K facet prompts.

Layout of one caption:  [prefix(caption)] [facet 1] [facet 2] ... [facet K]
Facet-decoupled attention: a prefix token sees the prefix causally; a facet token sees
the whole prefix and the earlier tokens of its own facet, never another facet. With
"restart" positions every facet is numbered as if it followed the prefix alone, so the
packed pass equals K separate passes exactly; "continue" numbers tokens 0..T-1 as the
released FLAME code does. "causal" is "continue" without the facet mask: one plain causal
sequence in which a later facet also sees the earlier facets (the ablation `flame study` runs
against facet-decoupled attention; not FLAME's recipe). The embedding of a facet is the hidden state at its last token
after the chosen decoder block(s) (before the final norm).

Tokens are those of one string: the release tokenizes `prefix(caption) [sep ]F1 F2 ... FK` (single
spaces) at once, so the facet ids here are cut out of one tokenization of the text after the caption,
and the prefix of every caption is checked to end on a token boundary. Text inside a caption never
becomes a control token (special-token strings there are plain text), and captions are capped at
`max_caption_tokens` so one huge caption cannot allocate a context-sized attention mask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flame.errors import FlameError
from flame.prompts import DEFAULT_MAX_CAPTION_TOKENS, PromptSet, clean_caption, load_prompt_set

log = logging.getLogger(__name__)
POSITIONS = ("restart", "continue", "causal")
# A caption is first cut to this many characters per allowed token: no token is this long, so the cut
# only bounds the tokenizer's work on a pathological caption (a 200k-character one costs ~16k characters).
CHARS_PER_TOKEN = 32
_PROBE = "a photo of a dog."  # any caption: the token-boundary check at construction uses it


@dataclass
class _Item:
    """Token ids of one sequence: a prefix and the facets that share it."""

    prefix: list[int]
    facets: list[list[int]]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(f) for f in self.facets)


class _Stop(Exception):
    """Raised by the hook on the deepest needed block: nothing above it is computed."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of decoder blocks, found by shape rather than by architecture name."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise FlameError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def resolve_layers(layer: int | Sequence[int], n_layers: int) -> list[int]:
    """1-based block indices as in the paper (39 of 40); negative counts from the top."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers:
        raise FlameError("layer: give at least one block index")
    out = []
    for i in layers:
        j = i + n_layers + 1 if i < 0 else i
        if not 1 <= j <= n_layers:
            raise FlameError(
                f"layer {i} is out of range for a model with {n_layers} blocks "
                f"(use 1..{n_layers}, or -{n_layers}..-1 counting from the top)"
            )
        out.append(j)
    return out


def default_max_batch(batch_tokens: int, on_gpu: bool) -> int:
    """Sequences per forward when the user sets none. On a GPU the token budget is what should bind:
    no sequence is shorter than 16 tokens (template, caption, facet), so batch_tokens / 16 rows never
    cut a batch before its budget (GEMMs of the full 65,536 rows even for the raw set). On the CPU
    64, as ever (a batch there is already long enough to keep the cores busy)."""
    return max(1, batch_tokens // 16) if on_gpu else 64


@dataclass
class Prepared:
    """The host side of one `encode` call, done ahead of the model (`FacetEncoder.prepare`, e.g. on a
    prefetch thread): the unique captions, their sequences and each batch's host tensors."""

    cleaned: list[str]
    unique: list[str]
    items: list[_Item]
    slot: dict[tuple[int, int], int]  # (item, facet in item) -> flat (caption, facet) row
    batches: list[tuple[list[int], tuple]]  # (item indices, (ids, pos, group, last)) per forward
    packed: bool
    truncated: int  # captions shortened while preparing


class FacetEncoder:
    """Captions -> [N, K, D] facet embeddings of a frozen LLM (see the module docstring).

    `max_caption_tokens` caps the caption's own share of a sequence (None: only the model's context
    limits it); shortened captions are counted in `truncated`."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        prompts: str | PromptSet = "long",
        layer: int | Sequence[int] = -2,
        positions: str = "restart",
        batch_tokens: int | None = None,
        max_batch: int | None = None,
        max_length: int | None = None,
        max_caption_tokens: int | None = DEFAULT_MAX_CAPTION_TOKENS,
    ):
        if positions not in POSITIONS:
            raise FlameError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
        if max_caption_tokens is not None and (isinstance(max_caption_tokens, bool) or max_caption_tokens < 1):
            raise FlameError(
                f"max_caption_tokens (--max-caption-tokens) must be 1 or more tokens, not {max_caption_tokens!r}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.prompts = load_prompt_set(prompts)
        self.positions = positions
        self.layer = resolve_layers(layer, model.config.num_hidden_layers)
        # Padded tokens per forward. Small batches of length-sorted captions waste ~3% on padding
        # (benchmarks/pack_rows.py measured this beating block-diagonal multi-caption rows on CPU).
        on_gpu = next(model.parameters()).device.type == "cuda"
        self.batch_tokens = batch_tokens or (65536 if on_gpu else 4096)
        self.max_batch = max_batch or default_max_batch(self.batch_tokens, on_gpu)
        self._pin = on_gpu  # host tensors pinned, copied without blocking the host
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_caption_tokens = max_caption_tokens
        self.truncated = 0  # captions shortened by the caption cap or the context, over the encoder's life
        self.tokens = 0  # non-padding tokens run through the model, for throughput figures
        self._blocks = decoder_layers(model)
        before, after = self.prompts.split_prefix()
        # Whitespace that ends the prefix starts the first facet token instead (" this", not " " + "this"),
        # so the packed text tokenizes as the natural sentence would.
        self._before, self._after = before, after.rstrip()
        self._lead = after[len(self._after) :]
        self._facet_ids = self._cut_facets()
        self._template = len(self._text_ids(self._before + self._after))  # prefix tokens of an empty caption
        self._check_boundary()

    @property
    def k(self) -> int:
        return self.prompts.k

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _text_ids(self, text: str) -> list[int]:
        """Ids of text holding a caption: the tokenizer's own BOS/EOS are added where it adds them, and
        special-token strings inside the text (`<|im_end|>`, `<s>`, ...) stay plain text."""
        return self.tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]

    # ---- tokenization -------------------------------------------------------------------------
    def facet_texts(self) -> list[str]:
        """The text of each facet as it follows the prefix. continue: the release's one string
        `[sep ]F1 F2 ... FK` (single spaces; `sep`, the release's `<s>`, belongs to F1); restart: each
        facet follows the prefix on its own."""
        p = self.prompts
        if self.positions == "restart":
            return [self._lead + f for f in p.facets]
        first = self._lead + (p.sep + " " if p.sep else "") + p.facets[0]
        return [first] + [" " + f for f in p.facets[1:]]

    def _cut_facets(self) -> list[list[int]]:
        """Facet ids cut out of ONE tokenization of the text after the caption (in continue mode all
        facets in one string, as the release tokenizes them), so merges at piece boundaries come out as
        the tokenizer makes them. Special tokens written in the prompt set (the release's `<s>`) count."""
        chains = [self.facet_texts()] if self.positions != "restart" else [[t] for t in self.facet_texts()]
        out = []
        for chain in chains:
            text, prev = self._after, self._ids(self._after)
            for piece in chain:
                text += piece
                cur = self._ids(text)
                if cur[: len(prev)] != prev or len(cur) == len(prev):
                    raise FlameError(
                        f"prompt set {self.prompts.name!r}: this tokenizer merges a facet prompt with the text "
                        "before it, so the facets cannot be cut apart; start each facet with a space"
                    )
                out.append(cur[len(prev) :])
                prev = cur
        return out

    def _check_boundary(self) -> None:
        """The packed ids must be the one-string tokenization: the prefix has to end on a token boundary."""
        head = self._before + _PROBE + self._after
        prefix = self._ids(head, special=True)
        pairs = list(zip(self._facet_ids, self.facet_texts()))
        groups = [pairs] if self.positions != "restart" else [[p] for p in pairs]
        for group in groups:
            whole = self._ids(head + "".join(text for _, text in group), special=True)
            if whole != prefix + [i for ids, _ in group for i in ids]:
                raise FlameError(
                    f"prompt set {self.prompts.name!r}: this tokenizer joins the end of the prefix with a "
                    "facet, so prefix and facets cannot be tokenized apart"
                )

    def _facets(self) -> list[list[int]]:
        return self._facet_ids

    def _prefixes(self, captions: list[str]) -> list[tuple[list[int], bool]]:
        """`_prefix` of every caption, the common case tokenized in one batch call of the (fast)
        tokenizer: the ids are those of one call per caption; a caption over its room takes the
        cutting path of `_prefix`."""
        room, chars = self._room()
        heads = [c[:chars] if chars is not None else c for c in captions]
        texts = [self._before + c + self._after for c in heads]
        ids = self.tokenizer(texts, add_special_tokens=True, split_special_tokens=True)["input_ids"] if texts else []
        out = []
        for cap, head, one in zip(captions, heads, ids):
            out.append((one, len(head) < len(cap)) if len(one) <= room else self._prefix(cap))
        return out

    def _room(self) -> tuple[int, int | None]:
        """(tokens a prefix may take, characters a caption is first cut to (None: no cap))."""
        facets = self._facet_ids
        room = self.max_length - (
            sum(map(len, facets)) if self.positions != "restart" else max(map(len, facets))
        )
        if self.max_caption_tokens is None:
            return room, None
        return min(room, self._template + self.max_caption_tokens), self.max_caption_tokens * CHARS_PER_TOKEN

    def _prefix(self, caption: str) -> tuple[list[int], bool]:
        """Prefix ids for one caption, shortening only the caption when it is over `max_caption_tokens`
        or the sequence would not fit the model's context. Returns (ids, truncated)."""
        room, chars = self._room()
        cut = False
        if chars is not None and len(caption) > chars:
            caption, cut = caption[:chars], True
        ids = self._text_ids(self._before + caption + self._after)
        if len(ids) <= room:
            return ids, cut
        enc = self.tokenizer(
            caption, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
        )
        keep = len(enc["input_ids"]) - (len(ids) - room)
        while keep > 0:
            cut_text = caption[: enc["offset_mapping"][keep - 1][1]]
            ids = self._text_ids(self._before + cut_text + self._after)
            if len(ids) <= room:
                return ids, True
            keep -= len(ids) - room  # the cut text tokenized differently at its end: drop the overshoot
        ids = self._text_ids(self._before + self._after)
        if len(ids) > room:
            raise FlameError(f"the prompt set {self.prompts.name!r} alone does not fit in {self.max_length} tokens")
        return ids, True

    def shortened(self, caption: str) -> bool:
        """Whether `caption` is cut (by the caption cap or the context) when it is encoded."""
        return self._prefix(clean_caption(caption))[1]

    def layout(self, caption: str) -> tuple[list[int], list[int]]:
        """One caption's packed sequence as the model sees it: token ids (prefix, then the facets in
        order) and the K positions its embeddings are read at (each facet's last token). In continue
        mode the ids are those of the release's one templated string. For tests and inspection."""
        prefix, _ = self._prefix(clean_caption(caption))
        ids, reads = list(prefix), []
        for facet in self._facet_ids:
            ids += facet
            reads.append(len(ids) - 1)
        return ids, reads

    def _items(self, captions: list[str], packed: bool) -> tuple[list[_Item], list[tuple[int, int]]]:
        """Sequences to run and, per (caption, facet), where its embedding comes from."""
        items, where = [], []
        facets = self._facets()
        for prefix, cut in self._prefixes(captions):
            self.truncated += cut
            if packed:
                where.extend((len(items), k) for k in range(len(facets)))
                items.append(_Item(prefix, facets))
            else:
                where.extend((len(items) + k, 0) for k in range(len(facets)))
                items.extend(_Item(prefix, [f]) for f in facets)
        return items, where

    # ---- batching and masks -------------------------------------------------------------------
    def _batches(self, items: list[_Item]) -> list[list[int]]:
        """Length-sorted batches under a padded-token budget: little padding, bounded memory."""
        order = sorted(range(len(items)), key=lambda i: -items[i].length)
        batches, cur = [], []
        for i in order:
            longest = items[cur[0]].length if cur else items[i].length
            if cur and (len(cur) >= self.max_batch or (len(cur) + 1) * longest > self.batch_tokens):
                batches.append(cur)
                cur = []
            cur.append(i)
        return batches + ([cur] if cur else [])

    def _host_tensors(self, items: list[_Item]) -> tuple[torch.Tensor, ...]:
        """(input ids, position ids, group, last-token index of each facet) on the host, pinned for
        a GPU. group: 0 prefix, k > 0 facet k, -1 padding (the mask is built from it on the device)."""
        pad = self.tokenizer.pad_token_id or 0
        T = max(it.length for it in items)
        B = len(items)
        ids = torch.full((B, T), pad, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        group = torch.full((B, T), -1, dtype=torch.long)
        last = torch.zeros((B, max(len(it.facets) for it in items)), dtype=torch.long)
        for b, it in enumerate(items):
            P = len(it.prefix)
            ids[b, :P] = torch.tensor(it.prefix)
            pos[b, :P] = torch.arange(P)
            group[b, :P] = 0
            t = P
            for k, f in enumerate(it.facets):
                n = len(f)
                ids[b, t : t + n] = torch.tensor(f)
                start = t if self.positions != "restart" else P
                pos[b, t : t + n] = torch.arange(start, start + n)
                group[b, t : t + n] = k + 1
                t += n
                last[b, k] = t - 1
        out = (ids, pos, group, last)
        return tuple(x.pin_memory() for x in out) if self._pin else out

    def _mask(self, group: torch.Tensor) -> torch.Tensor:
        """The facet-decoupled attention mask [B, 1, T, T], built where `group` is (the device)."""
        B, T = group.shape
        q, kv = group[:, :, None], group[:, None, :]
        causal = torch.ones(T, T, dtype=torch.bool, device=group.device).tril()
        allowed = causal & (kv >= 0) & (q >= 0)
        if self.positions != "causal":  # facet-decoupled: a facet sees the prefix and itself only
            allowed &= (kv == 0) | (kv == q)
        allowed |= torch.eye(T, dtype=torch.bool, device=group.device)  # padding rows see themselves
        if self.model.config._attn_implementation == "sdpa":
            return allowed[:, None]  # a boolean mask keeps SDPA on its fast kernels
        dtype = self.model.dtype  # eager adds the mask to the scores
        return torch.zeros(B, 1, T, T, dtype=dtype, device=group.device).masked_fill(
            ~allowed[:, None], torch.finfo(dtype).min)

    def _tensors(self, items: list[_Item]):
        """input ids, 4-D mask, position ids and last-token index of each facet, on the host."""
        ids, pos, group, last = self._host_tensors(items)
        return ids, self._mask(group), pos, last

    # ---- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _hidden(self, host: tuple[torch.Tensor, ...], tokens: int) -> torch.Tensor:
        """Run one batch of `_host_tensors`; -> [B, max facets, D] float32 at each facet's last token."""
        device = next(self.model.parameters()).device
        ids, pos, group, last = (x.to(device, non_blocking=True) for x in host)
        captured: dict[int, torch.Tensor] = {}
        deepest = max(self.layer)

        def hook(index):
            def fn(module, args, output):
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == deepest:
                    raise _Stop

            return fn

        handles = [self._blocks[i - 1].register_forward_hook(hook(i)) for i in set(self.layer)]
        try:
            self.model(input_ids=ids, attention_mask=self._mask(group), position_ids=pos, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        self.tokens += tokens
        index = last[:, :, None].expand(-1, -1, captured[deepest].shape[-1])
        # the facet positions first, then float32: not the whole [B, T, D] state
        return torch.stack([captured[i].gather(1, index).float() for i in self.layer]).mean(0).cpu()

    def prepare(self, captions: Sequence[str], packed: bool = True) -> Prepared:
        """The host work of `encode` (cleaning, dedupe, tokenizing, batching, host tensors): safe to run
        on another thread while the model runs an earlier `Prepared` (one preparing thread at a time)."""
        cleaned = [clean_caption(c) for c in captions]
        unique = list(dict.fromkeys(cleaned))
        before = self.truncated
        items, where = self._items(unique, packed) if unique else ([], [])
        slot = {key: flat for flat, key in enumerate(where)}
        batches = [(b, self._host_tensors([items[i] for i in b])) for b in self._batches(items)] if items else []
        return Prepared(cleaned, unique, items, slot, batches, packed, self.truncated - before)

    def run(self, prep: Prepared, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The model side of `encode`: a `Prepared` -> float32 [N, K, D]."""
        out = torch.empty(len(prep.unique), self.k, self.dim)
        flat_out, items = out.view(-1, self.dim), prep.items
        for batch, host in prep.batches:
            tokens = sum(items[i].length for i in batch)
            hidden = self._hidden(host, tokens)
            for row, i in enumerate(batch):
                for f in range(len(items[i].facets)):
                    flat_out[prep.slot[(i, f)]] = hidden[row, f]
            if progress:
                progress(len(batch) if prep.packed else len(batch) / self.k, tokens)
        if prep.truncated:
            log.warning("%d caption(s) shortened to the caption cap (%s tokens) or the context (%d tokens)",
                        prep.truncated, self.max_caption_tokens, self.max_length)
        index = {c: i for i, c in enumerate(prep.unique)}
        return out[[index[c] for c in prep.cleaned]] if len(prep.unique) != len(prep.cleaned) else out

    def encode(
        self,
        captions: Sequence[str],
        packed: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Captions -> float32 [N, K, D] facet embeddings (not normalised). Identical captions
        are computed once. `packed=False` runs the K facets as separate sequences (the
        reference the packed pass is checked against). `progress(captions, tokens)` is
        called after every batch."""
        return self.run(self.prepare(captions, packed), progress)
