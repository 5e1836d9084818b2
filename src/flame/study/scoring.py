"""Scoring one trained arm on the splits its parts read, with the demo's metric code
(`flame.demo.evaluation`) for retrieval and zero-shot, and SugarCrepe's strict reading
(`flame.evaluate.benchmark.selection`) for the hard negatives."""

from __future__ import annotations

import json
from pathlib import Path

from flame.data.scenes import NEGATIVES

# FLAME reads a long caption with the long prompt set (as the release does for long-caption
# retrieval) and everything else with the raw prompt; CLIP has one text tower and no prompts
PROMPTS = {"long-late": "long", "long-front": "long"}
RAW = "raw"


def texts_needed(eval_root: Path, splits: tuple[str, ...]) -> dict[str, list[str]]:
    """Prompt set -> every text a FLAME arm's `splits` encode (one LLM pass per set before scoring)."""
    from flame.evaluate import load_dataset
    from flame.evaluate.tasks import texts_needed as task_texts

    out: dict[str, list[str]] = {}
    for split in splits:
        if split == "hard-negatives":
            texts = [t for r in read_pairs(eval_root) for t in (r["caption"], r["negative"])]
        else:
            task = "zeroshot_classification" if split == "zeroshot" else "zeroshot_retrieval"
            texts = task_texts(load_dataset(eval_root / split), task)
        out.setdefault(PROMPTS.get(split, RAW), []).extend(texts)
    return out


def read_pairs(eval_root: Path) -> list[dict]:
    return [json.loads(line) for line in (eval_root / NEGATIVES).read_text().splitlines() if line.strip()]


def score(model, text, eval_root: Path, splits: tuple[str, ...], image_cache: Path) -> dict:
    """{split: metrics} for one model (`text`: CLIP's text side, or None for FLAME's own)."""
    from flame.demo.evaluation import our_metrics
    from flame.evaluate import evaluate, load_dataset

    out: dict = {}
    for split in splits:
        if split == "hard-negatives":
            out[split] = hard_negatives(model, text, eval_root, image_cache)
            continue
        task = "zeroshot-classification" if split == "zeroshot" else "retrieval"
        ds = load_dataset(eval_root / split, task=task)
        r = evaluate(model, ds, task=task, prompts=PROMPTS.get(split, RAW), workers=0, cache_dir=image_cache,
                     progress=False, text=text)
        out[split] = our_metrics(r, split, len(ds.classnames or []) if split == "zeroshot" else 0)
    return out


def hard_negatives(model, text, eval_root: Path, image_cache: Path) -> dict:
    """Each test image against its own caption and the same caption with two attributes swapped:
    the share of images that score their caption strictly higher (a tie is wrong), overall and per swap."""
    import torch

    from flame.evaluate import load_dataset
    from flame.evaluate.benchmark.selection import instance_scores
    from flame.evaluate.images import split_vectors

    ds = load_dataset(eval_root / "test", task="retrieval")
    vectors = split_vectors(model, ds, workers=0, cache_dir=image_cache, progress=False)
    index = {it.key: i for i, it in enumerate(ds.items("test"))}
    rows = read_pairs(eval_root)
    images = vectors.vectors[torch.tensor([index[r["key"]] for r in rows])]
    texts = [t for r in rows for t in (r["caption"], r["negative"])]
    encode = text.encode if text is not None else (lambda t, prompts: model.encode_text(t, prompts=prompts))
    vecs = encode(texts, prompts=RAW).float().reshape(len(rows), 2, -1)
    right = instance_scores(images[:, None, :], vecs)["text_score"]
    out = {"accuracy": float(right.float().mean()), "pairs": len(rows), "chance": 0.5}
    for swap in sorted({r["swap"] for r in rows}):
        mask = torch.tensor([r["swap"] == swap for r in rows])
        out[swap] = float(right[mask].float().mean())
    return out
