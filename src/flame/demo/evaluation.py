"""Stage 6 of `flame demo`: both models on every split with the same metric code
(`flame.evaluate`), reduced to the demo's metrics {model: {split: {metric: value}}}."""

from __future__ import annotations

import json

from flame.demo.facts import MODELS, SPLITS, DemoPaths, load_clip, load_flame
from flame.demo.settings import DemoSettings


def eval_texts(paths: DemoPaths) -> dict[str, list[str]]:
    """Split -> the texts its evaluation encodes (captions, or class prompts)."""
    from flame.evaluate import load_dataset
    from flame.evaluate.tasks import texts_needed

    out = {split: texts_needed(load_dataset(paths.data / "eval" / split), "zeroshot_retrieval") for split in SPLITS}
    out["zeroshot"] = texts_needed(load_dataset(paths.data / "eval" / "zeroshot"), "zeroshot_classification")
    return out


def eval_texts_cached(paths: DemoPaths, s: DemoSettings) -> bool:
    """Whether the trained model's text cache already holds every evaluation text (then the
    LLM is not needed again)."""
    ckpt = paths.flame_checkpoint(s.steps)
    if not (ckpt / "config.json").is_file() or not (paths.data / "settings.json").is_file():
        return False
    from flame.textenc import TextEncoder

    enc = TextEncoder(json.loads((ckpt / "config.json").read_text())["text"], cache_dir=paths.text_cache)
    texts = [t for v in eval_texts(paths).values() for t in v]
    return not enc.missing(texts, s.eval_prompts)


def evaluate_models(paths: DemoPaths, s: DemoSettings, progress: bool) -> dict:
    """Encode the evaluation texts not cached yet (one LLM pass for every split), then evaluate
    FLAME and CLIP on each split."""
    from flame.evaluate import evaluate, load_dataset

    flame = load_flame(paths, s.steps)
    texts = eval_texts(paths)
    todo = flame.text_encoder.missing([t for v in texts.values() for t in v], s.eval_prompts)
    if todo:  # one LLM pass with one progress bar for every split's texts; evaluate() then reads the cache
        print(f"      encoding {len(todo)} new evaluation texts with {s.llm} ({s.eval_prompts} prompts)", flush=True)
        flame.encode_text(todo, prompts=s.eval_prompts, progress=progress)
        flame.text_encoder.unload()
    clip_image, clip_text = load_clip(paths)
    models = {"flame": (flame, None), "clip": (clip_image, clip_text)}
    metrics: dict = {m: {} for m in MODELS}
    for split in (*SPLITS, "zeroshot"):
        task = "zeroshot-classification" if split == "zeroshot" else "retrieval"
        ds = load_dataset(paths.data / "eval" / split, task=task)
        for name, (model, text) in models.items():
            r = evaluate(model, ds, task=task, prompts=s.eval_prompts, workers=0, cache_dir=paths.image_cache,
                         progress=False, text=text)
            metrics[name][split] = our_metrics(r, split, len(ds.classnames or []) if split == "zeroshot" else 0)
    for name in MODELS:
        langs = [metrics[name][split] for split in SPLITS if split.startswith("multilingual-")]
        metrics[name]["multilingual"] = {k: sum(m[k] for m in langs) / len(langs) for k in langs[0]}
    return metrics


def our_metrics(result: dict, split: str, classes: int) -> dict:
    m = result["metrics"]
    if split == "zeroshot":
        return {"top1": m["acc1"], "top5": m.get("acc5"), "chance": 1.0 / classes}
    n = result["images"] - result.get("skipped_images", 0)
    return {
        "i2t_r1": m["text_retrieval_recall@1"], "t2i_r1": m["image_retrieval_recall@1"],
        "i2t_r5": m["text_retrieval_recall@5"], "t2i_r5": m["image_retrieval_recall@5"],
        "chance_r1": 1.0 / n, "chance_r5": min(1.0, 5.0 / n),
    }
