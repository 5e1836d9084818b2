"""CLIP_benchmark's `image_caption_selection` task (SugarCrepe, Winoground), on vectors computed
once per distinct image and text.

Each instance has `nim` images and `nt` captions; image k belongs with caption k for k < min(nim, nt).
Two readings of "correct" are kept, because the two harnesses differ exactly on ties:

- CLIP_benchmark (`metrics/image_caption_selection.py`): `text_acc` (every image's argmax caption
  is its own), `image_acc` (every caption's argmax image is its own), `acc` (both). `torch.argmax`
  returns the first maximal index, so a tie goes to index 0.
- strict (the Winoground paper, SugarCrepe's own `main_eval.py`): `text_score` (every image scores
  its caption above every other caption), `image_score` (every caption scores its image above every
  other image), `group_score` (both). A tie is wrong.

`tie` marks an instance where a correct pair scores exactly as much as a competing one (fp32 cosine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flame.evaluate.benchmark.base import CLIP_BENCHMARK_CAP, Options
from flame.evaluate.datasets import EvalDataset, Item
from flame.evaluate.images import SplitVectors

TASK = "image_caption_selection"  # CLIP_benchmark's task name
PROMPTS = "long"  # EVAL.md section 0: the release ran both sets with multi_template=True
CHUNK = 512  # instances scored at once (bounded memory: CHUNK x nim x nt x D floats)
KEYS = ("text_acc", "image_acc", "acc", "text_score", "image_score", "group_score", "tie")


def instance_scores(images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per instance, every reading of correct: `images` [N, nim, D], `texts` [N, nt, D] (L2-normalised)
    -> {key: bool [N]} for KEYS."""
    # [N, nim, nt]: s[n, i, t] = cos(image i, caption t), each a product summed on its own, so that
    # equal vectors give equal scores (a matrix product need not: its rows may take other paths)
    s = (images[:, :, None, :] * texts[:, None, :, :]).sum(dim=-1)
    n, nim, nt = s.shape
    g = min(nim, nt)
    gt = torch.arange(g)
    text_acc = (s.argmax(dim=2)[:, :g] == gt).all(dim=1)
    image_acc = (s.argmax(dim=1)[:, :g] == gt).all(dim=1)
    own = s[:, gt, gt]  # [N, g]
    # the best competitor of each correct pair: other captions for image k, other images for caption k
    off = torch.full((nim, nt), False)
    off[gt, gt] = True
    masked = s.masked_fill(off, float("-inf"))
    rival_caption = masked[:, :g, :].amax(dim=2)  # [N, g]
    rival_image = masked[:, :, :g].amax(dim=1)  # [N, g]
    text_score = (own > rival_caption).all(dim=1)
    image_score = (own > rival_image).all(dim=1)
    tie = ((own == rival_caption) | (own == rival_image)).any(dim=1)
    return {"text_acc": text_acc, "image_acc": image_acc, "acc": text_acc & image_acc, "text_score": text_score,
            "image_score": image_score, "group_score": text_score & image_score, "tie": tie}


def score(image_vecs: torch.Tensor, text_vecs: torch.Tensor, image_index: torch.Tensor,
          text_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """`instance_scores` of instances given as rows of indices into the vectors ([N, nim] into
    `image_vecs`, [N, nt] into `text_vecs`), CHUNK instances at a time."""
    parts = [instance_scores(image_vecs[image_index[a:a + CHUNK]], text_vecs[text_index[a:a + CHUNK]])
             for a in range(0, len(image_index), CHUNK)]
    if not parts:
        return {k: torch.zeros(0, dtype=torch.bool) for k in KEYS}
    return {k: torch.cat([p[k] for p in parts]) for k in KEYS}


def summary(per: dict[str, torch.Tensor], keys: Sequence[str], mask: torch.Tensor | None = None) -> tuple[dict, int]:
    """The fractions of instances (`mask`: those counted) correct under each of `keys`, and the ties."""
    pick = (lambda t: t) if mask is None else (lambda t: t[mask])
    n = int(pick(per["tie"]).numel())
    metrics = {k: (int(pick(per[k]).sum()) / n if n else None) for k in keys}
    return metrics, int(pick(per["tie"]).sum())


@dataclass
class TextVectors:
    vectors: torch.Tensor  # [T, D] for the distinct texts
    index: dict[str, int]
    truncated: int


def encode_texts(model, texts: Sequence[str], opts: Options) -> TextVectors:
    """Every distinct text once, with the long set and CLIP_benchmark's caption cap (512 tokens with
    the BOS, EVAL.md section 0), through the model's text encoder (cached on disk), and how many of
    them the cap cuts."""
    distinct = list(dict.fromkeys(texts))
    encoder = model.text_encoder
    vectors = encoder.encode(distinct, prompts=PROMPTS, progress=opts.progress, context_length=CLIP_BENCHMARK_CAP)
    return TextVectors(vectors, {t: i for i, t in enumerate(distinct)},
                       encoder.count_truncated(distinct, PROMPTS, CLIP_BENCHMARK_CAP))


def image_vectors(model, root: Path, name: str, files: Sequence[Path], opts: Options,
                  cache: bool = True) -> SplitVectors:
    """Every distinct image once, through the evaluation image path (DataLoader workers, the disk
    cache unless `cache` is False, unreadable images counted and refused beyond --max-unreadable)."""
    from flame.evaluate.tasks import _readable

    ds = EvalDataset(path=root, name=name, format="table", kind="retrieval",
                     splits={"test": [Item(file=str(f)) for f in files]})
    img = opts.image_options()
    if not cache:
        img["cache_dir"] = False
    return _readable(model, ds, "test", "embed", img)
