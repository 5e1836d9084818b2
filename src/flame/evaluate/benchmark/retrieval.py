"""The retrieval runner the benchmark readers share: images, captions and which image each caption
belongs to in; one CLIP_benchmark-shaped result out, ranked in bounded memory
(`flame.evaluate.metrics.retrieval_ranks`), with what was used (`prompts`, `images`, `texts`) and
what could bend the numbers (`truncated` captions, tied top-1 scores) recorded beside the metrics.

    pairs = RetrievalSet(root, "urban-1k", [Item(file=...)], ["The image ..."], [0])
    result = retrieve(model, pairs, opts, ks=(1,), context_length=1024, first_max=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flame.errors import FlameError
from flame.evaluate.benchmark.base import Options
from flame.evaluate.datasets import EvalDataset, Item
from flame.evaluate.metrics import retrieval_ranks
from flame.evaluate.tasks import _model_name, _readable


@dataclass
class RetrievalSet:
    """What a benchmark reader hands the runner: `items[i]` is image i (a file, or a shard and key
    for `fmt="wds"`), `captions[t]` belongs to image `owner[t]`; `record` goes into the result
    (e.g. `missing_images` under --allow-missing)."""

    root: Path
    name: str
    items: list[Item]
    captions: list[str]
    owner: list[int]
    fmt: str = "table"
    language: str = "en"
    record: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.captions) != len(self.owner):
            raise ValueError(f"{len(self.captions)} captions but {len(self.owner)} owners")
        if any(not 0 <= o < len(self.items) for o in self.owner):
            raise ValueError("a caption's owner is not one of the images")


def encode_captions(model, captions: Sequence[str], prompts: str, context_length: int | None,
                    progress: bool) -> tuple[torch.Tensor, dict]:
    """Caption vectors through the model's text encoder with the protocol's cap, and what to
    record: `truncated` = distinct captions the cap shortens (counted every run, cached or not)."""
    text = model.text_encoder
    emb = text.encode(list(captions), prompts=prompts, progress=progress, context_length=context_length)
    return emb, {"truncated": text.count_truncated(captions, prompts, context_length)}


def retrieve(model, pairs: RetrievalSet, opts: Options, *, prompts: str = "long", ks: Sequence[int] = (1,),
             context_length: int | None = None, first_max: bool = False) -> dict:
    """Run retrieval on `pairs` and return one CLIP_benchmark-shaped result:
    ``{"dataset", "model", "task": "zeroshot_retrieval", "language", "metrics", "prompts", "images",
    "texts", "truncated", "ties", "context_length", "skipped_images", **record}``.

    - Captions are encoded with prompt set `prompts`, capped at `context_length` tokens as the
      release's first tokenisation caps them (its BOS counted: 1024 in the long-caption scripts,
      512 through CLIP_benchmark); texts first, so LLM problems come before any image is decoded.
    - Images go through the evaluation cache and transform (`flame.evaluate.images`); an image
      that cannot be decoded takes its captions out with it, within `opts.max_unreadable`
      (`skipped_images` records how many).
    - metrics: `image_retrieval_recall@k` (T2I) and `text_retrieval_recall@k` (I2T, any of the
      image's captions) for k in `ks`; `first_max`: recall@1 by argmax (a tie goes to the lower
      index, as `torch.argmax` in the release's scripts), else by `torch.topk` (CLIP_benchmark).
    - `ties`: queries whose top-1 score is attained by more than one candidate, per direction,
      counted in the same bounded score blocks.
    """
    if not pairs.items or not pairs.captions:
        raise FlameError(f"{pairs.name}: no image-caption pairs to evaluate in {pairs.root}")
    emb, text_record = encode_captions(model, pairs.captions, prompts, context_length, opts.progress)
    ds = EvalDataset(pairs.root, pairs.name, pairs.fmt, "retrieval", {"test": pairs.items}, language=pairs.language)
    vec = _readable(model, ds, "test", "embed", opts.image_options())
    keep = torch.nonzero(vec.ok).flatten()
    new_index = torch.full((len(pairs.items),), -1, dtype=torch.long)
    new_index[keep] = torch.arange(len(keep))
    owner = new_index[torch.as_tensor(pairs.owner, dtype=torch.long)]
    rows = torch.nonzero(owner >= 0).flatten()
    images = vec.vectors if len(keep) == len(pairs.items) else vec.vectors[keep]
    metrics, ties = retrieval_ranks(images, emb, owner[rows], ks, device=getattr(model, "device", None),
                                    text_rows=None if len(rows) == len(owner) else rows, overwrite=True,
                                    ties=True, first_max=first_max)
    return {"dataset": pairs.name, "model": _model_name(model), "task": "zeroshot_retrieval",
            "language": pairs.language, "metrics": metrics, "prompts": prompts, "images": len(keep),
            "texts": len(rows), **text_record, "ties": ties, "context_length": context_length,
            "skipped_images": vec.skipped, **pairs.record}


__all__ = ["RetrievalSet", "encode_captions", "retrieve"]
