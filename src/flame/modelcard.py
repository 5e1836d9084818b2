"""The model card (README.md) of a shared FlameModel: what the model is, its text side, its
training data and recipe (the run's train-config.json) or its provenance (a converted release
model), and `flame eval` results as the Hub's `model-index` metadata.

The metadata block is written by huggingface_hub's own `ModelCardData` / `EvalResult`, so the
Hub (and `huggingface_hub.ModelCard.load`) reads it as it writes it. Local paths in the
records (shards, stores, a local LLM folder) are shortened to their last part: a card is
public, the machine's folder layout is not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from flame.errors import FlameError

# CLIP_benchmark's task names -> (Hub task type, readable name)
TASKS = {
    "zeroshot_classification": ("zero-shot-image-classification", "Zero-shot image classification"),
    "zeroshot_retrieval": ("zero-shot-retrieval", "Zero-shot image-text retrieval"),
    "linear_probe": ("image-classification", "Linear probe"),
}
METRIC_NAMES = {"acc1": "top-1 accuracy", "acc5": "top-5 accuracy", "mean_per_class_recall": "mean per-class recall",
                "lp_acc1": "top-1 accuracy", "lp_acc5": "top-5 accuracy",
                "lp_mean_per_class_recall": "mean per-class recall"}
# the training settings the card's recipe table shows first (the rest follow in the record's order)
RECIPE = ("tower", "tower_init", "image_size", "embed_dim", "proj_hidden", "pool_first", "facets", "positives",
          "loss", "init_logit_scale", "batch_size", "accum", "steps", "epochs", "lr", "min_lr", "warmup", "betas",
          "eps", "weight_decay", "crop_scale", "precision", "seed")
_SKIP = ("data", "embeddings", "out", "device", "workers", "log_every", "save_every", "keep", "progress", "tensorboard",
         "resume", "force", "report_to", "eval_suite", "eval_every")


def public(value):
    """A local path (absolute, `~`, `./`) as its last part; everything else as it is."""
    if isinstance(value, str) and value.startswith(("/", "~", "./", "../", "\\")) or (
            isinstance(value, str) and len(value) > 2 and value[1:3] in (":\\", ":/")):
        return Path(value.replace("\\", "/")).name or value
    if isinstance(value, list):
        return [public(v) for v in value]
    return value


def _cell(value) -> str:
    value = public(value)
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: Iterable[tuple], head: tuple[str, ...]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return out


def train_record(source: Path | None) -> dict | None:
    """The train-config.json of the run whose checkpoint `source` is, or None."""
    from flame.runfolder import TRAIN_CONFIG, step_of

    if source is None or step_of(Path(source)) is None:
        return None
    try:
        doc = json.loads((Path(source).parent / TRAIN_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def read_evals(paths: Sequence[str | Path]) -> list[dict]:
    """The results in `flame eval --output` files (one result or a list, CLIP_benchmark's shape:
    dataset, task, metrics), checked; a file that is not one is a FlameError naming it."""
    results: list[dict] = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise FlameError(f"--eval {path}: cannot read it as JSON ({getattr(e, 'strerror', None) or e})") from None
        for i, r in enumerate(doc if isinstance(doc, list) else [doc]):
            ok = isinstance(r, dict) and isinstance(r.get("dataset"), str) and isinstance(r.get("metrics"), dict)
            if not ok or r.get("task") not in TASKS:
                raise FlameError(f"--eval {path}: entry {i} is not a flame eval result "
                                 f"(expected {{\"dataset\", \"task\": {' | '.join(TASKS)}, \"metrics\"}})")
            results.append(r)
    return results


def metric_name(metric: str) -> str:
    """CLIP_benchmark's metric key in words (image_retrieval_recall@k: each caption finds its image)."""
    for prefix, words in (("image_retrieval_recall@", "text-to-image recall@"),
                          ("text_retrieval_recall@", "image-to-text recall@")):
        if metric.startswith(prefix):
            return words + metric[len(prefix):]
    return METRIC_NAMES.get(metric, metric)


def _dataset(r: dict) -> str:
    """A result's dataset as the card names it: its suite name if it has one, else its dataset."""
    return str(public(r["name"] if isinstance(r.get("name"), str) and r["name"] else r["dataset"]))


def eval_results(results: Sequence[dict]) -> list:
    """`flame eval` results as huggingface_hub EvalResults (one per finite metric)."""
    from huggingface_hub import EvalResult

    out = []
    for r in results:
        task_type, task_name = TASKS[r["task"]]
        name = _dataset(r)
        for metric, value in r["metrics"].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                continue
            out.append(EvalResult(task_type=task_type, task_name=task_name, dataset_type=name, dataset_name=name,
                                  dataset_split=r.get("split") if isinstance(r.get("split"), str) else "test",
                                  metric_type=metric, metric_name=metric_name(metric),
                                  metric_value=round(float(value), 6)))
    return out


def metadata(name: str, results: Sequence[dict]) -> str:
    """The card's YAML front matter (without the --- lines)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="flame", model_name=name, pipeline_tag="zero-shot-image-classification",
                         tags=["flame", "clip", "image-feature-extraction", "frozen-llm-text-encoder"],
                         eval_results=eval_results(results) or None)
    return data.to_yaml()


def _about(name: str, cfg: dict, repo: str | None) -> list[str]:
    tower, text, image = cfg.get("tower", {}), cfg.get("text", {}), cfg.get("image", {})
    llm = public((text.get("llm") or {}).get("spec") or "an LLM")
    load = repo or "PATH/TO/THIS/FOLDER"
    return [
        f"# {name}", "",
        f"The image side of a [FLAME](https://github.com/MIV-XJTU/FLAME) model: a `{tower.get('tower')}` image "
        f"tower ({image.get('size')} px input, {tower.get('embed_dim')}-d output) trained so that its image vectors "
        f"match the multi-facet text embeddings of the frozen LLM `{llm}`. Text is encoded by that LLM with the "
        "prompt sets below; the LLM is not part of this repository and is loaded on first use of `encode_text`.",
        "", "## Usage", "", "```python", "from PIL import Image", "from flame import FlameModel", "",
        f'model = FlameModel.from_pretrained("{load}")',
        'image = model.encode_image([Image.open("photo.jpg")])  # [1, D], L2-normalised',
        'text = model.encode_text(["a photo of a dog", "a photo of a cat"])  # [2, D], raw prompt set',
        "probs = (model.logit_scale.exp() * image @ text.T).softmax(-1)", "```", "",
    ]


def _text_side(text: dict) -> list[str]:
    llm = text.get("llm") or {}
    rows = [("LLM", llm.get("spec")), ("LLM weights fingerprint", llm.get("fingerprint") or "not recorded"),
            ("hidden-state layer", text.get("layer")), ("facet positions", text.get("positions")),
            ("facets (K)", text.get("k")), ("width (D)", text.get("dim")), ("normalised", text.get("normalized")),
            ("max caption tokens", text.get("max_caption_tokens"))]
    out = ["## Text side", "", *_table([r for r in rows if r[1] is not None], ("", "")), ""]
    for s in text.get("prompt_sets") or []:
        out += [f"### Prompt set `{s.get('name')}`" + (f" (captions: {s['source']})" if s.get("source") else ""),
                "", f"Prefix: `{s.get('prefix')}`" + (f", separator `{s['sep']}`" if s.get("sep") else ""), "",
                "Facet prompts:", "", *[f"{i}. `{f}`" for i, f in enumerate(s.get("facets") or [])], ""]
    return out


def _tower(cfg: dict) -> list[str]:
    tower, image = cfg.get("tower", {}), cfg.get("image", {})
    rows = [(k, v) for k, v in tower.items() if v not in (None, {}, [])]
    rows += [("preprocessing", f"resize shorter side to {image.get('size')} (bicubic), centre crop, "
                               f"mean {image.get('mean')}, std {image.get('std')}")]
    return ["## Image tower", "", *_table(rows, ("", "")), ""]


def _training(train: dict | None, provenance: dict | None) -> list[str]:
    out = ["## Training", ""]
    if provenance:
        out += ["Converted, not trained here:", "", *_table(sorted(provenance.items()), ("", "")), ""]
    if not train:
        if not provenance:
            out += ["No training record (`train-config.json`) was found beside this model.", ""]
        return out
    cfg, data = train.get("config") or {}, train.get("data") or {}
    world = train.get("world_size") or 1
    batch = (cfg.get("batch_size") or 0) * (cfg.get("accum") or 1) * world
    out += ["Trained with `flame train` (settings from the run's `train-config.json`).", "",
            *_table([("image shards", cfg.get("data")), ("shard names", data.get("shards")),
                     ("embedding store", cfg.get("embeddings")), ("samples", data.get("samples")),
                     ("optimizer steps", train.get("steps")), ("processes", world),
                     ("global batch", batch or None)], ("data", "")), ""]
    keys = [k for k in RECIPE if k in cfg] + [k for k in cfg if k not in RECIPE and k not in _SKIP]
    rows = [(k, "default" if cfg[k] is None else cfg[k]) for k in keys]  # None: the default, resolved at run time
    out += [*_table(rows, ("setting", "value")), ""]
    return out


def _evaluation(results: Sequence[dict]) -> list[str]:
    if not results:
        return ["## Evaluation", "", "No `flame eval` results were given (`flame push --eval FILE.json`).", ""]
    rows = [(_dataset(r), r["task"], r.get("prompts", ""), m, f"{v:.4f}")
            for r in results for m, v in r["metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    return ["## Evaluation", "", "With `flame eval` (CLIP_benchmark's metrics):", "",
            *_table(rows, ("dataset", "task", "prompts", "metric", "value")), ""]


def model_card(cfg: dict, name: str, repo: str | None = None, train: dict | None = None,
               results: Sequence[dict] = ()) -> str:
    """The README.md text: YAML metadata, then the sections (module docstring). `cfg`: the
    model's config.json (with its `provenance` for a converted model); `train`: the run's
    train-config.json; `results`: `read_evals` output."""
    body = [*_about(name, cfg, repo), *_text_side(cfg.get("text") or {}), *_tower(cfg),
            *_training(train, cfg.get("provenance")), *_evaluation(results)]
    return f"---\n{metadata(name, results)}\n---\n\n" + "\n".join(body)
