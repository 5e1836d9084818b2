"""`flame eval`: zero-shot classification, retrieval and linear probes in CLIP_benchmark's conventions.

    flame eval --model RUN --task zeroshot-classification --dataset wds_imagenet1k [--language it]
    flame eval --model RUN --task retrieval --dataset captions.jsonl [--prompts long] --output r.json
    flame eval --model RUN --suite suite.yaml --output results.json
    flame eval --prepare --suite suite.yaml (--model RUN | --embeddings STORE) [--llm SPEC]

`--prepare` computes and caches every class-prompt and caption vector the suite needs (one LLM
load) without evaluating, e.g. before `flame train --eval suite.yaml`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from flame.errors import FlameError

log = logging.getLogger("flame.evaluate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Evaluate a FLAME model: zero-shot classification, image-text retrieval or a linear probe, on the "
        "CLIP_benchmark webdataset layout, a class-folder image set or a CSV/JSONL caption table. "
        "Metrics and JSON as CLIP_benchmark defines them."
    )
    p.add_argument("--model", metavar="M", help="run folder (latest checkpoint) or checkpoint/model folder")
    p.add_argument("--task", help="zeroshot-classification | retrieval | linear-probe (default: by the dataset)")
    p.add_argument("--dataset", metavar="PATH", help="dataset folder or CSV/JSONL file")
    p.add_argument("--suite", metavar="FILE",
                   help="YAML list of {dataset, task, language?, prompts?, name?, dataset_name?, templates?}")
    p.add_argument("--language", help="class-name / caption language (default en; tables: all rows)")
    p.add_argument("--dataset-name", help="CLIP_benchmark's name of the dataset (for shipped multilingual "
                                          "class names; default: the folder name without wds_)")
    p.add_argument("--templates", metavar="FILE|NAME",
                   help="zero-shot templates when the dataset has none: a file ({c} per line) or a shipped set")
    p.add_argument("--prompts", help="raw | short | long | a prompt-set file (default: raw for class prompts "
                                     "and short captions, long for long English captions)")
    p.add_argument("--output", metavar="FILE", help="write the results as JSON (a list for a suite)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding DataLoader workers (default 2)")
    p.add_argument("--device", default="auto", help="where the image tower runs: auto (default), cpu, cuda")
    p.add_argument("--llm", metavar="SPEC", help="LLM to load instead of the recorded one (same weights)")
    p.add_argument("--llm-device", help="where the LLM runs when texts are not cached (default: --device)")
    p.add_argument("--force-llm", action="store_true",
                   help="accept an LLM whose weight fingerprint differs from the model's")
    p.add_argument("--prepare", action="store_true", help="only compute and cache the suite's text vectors")
    p.add_argument("--embeddings", metavar="STORE", help="--prepare: take the text side from this embedding store")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _entries(args):
    from flame.evaluate.tasks import Suite, SuiteEntry, canonical_task

    if args.suite:
        if args.dataset:
            raise FlameError("give --dataset or --suite, not both")
        entries = Suite.from_file(args.suite).entries
        for e in entries:
            e.language = e.language or args.language
            e.prompts = e.prompts or args.prompts
            e.task = e.task or args.task
        return entries
    if not args.dataset:
        raise FlameError("--dataset PATH (or --suite FILE) is required")
    if args.task:
        canonical_task(args.task)
    return [SuiteEntry(args.dataset, args.task, args.language, args.prompts, None, args.dataset_name, args.templates)]


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 0:
        raise FlameError("--batch-size must be >= 1 and --workers >= 0")
    entries = _entries(args)
    if args.prepare:
        return prepare(args, entries)
    if not args.model:
        raise FlameError("--model is required (a run folder or a checkpoint folder)")
    from flame.distributed import resolve_device
    from flame.evaluate.tasks import evaluate
    from flame.model import FlameModel

    datasets = [checked(e) for e in entries]  # every dataset problem before the model is loaded
    device = resolve_device(args.device)
    model = FlameModel.from_pretrained(args.model, device=device, llm=args.llm,
                                       llm_device=args.llm_device or str(device), force_llm=args.force_llm)
    results = []
    for e, ds in zip(entries, datasets):
        result = evaluate(model, ds, e.task, e.prompts, batch_size=args.batch_size, workers=args.workers,
                          progress=args.progress)
        result["name"] = e.label(ds)
        results.append(result)
    model.text_encoder.unload()
    print(format_table(results))
    if args.output:
        from flame.fileio import write_atomic

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(results[0] if len(results) == 1 and not args.suite else results, indent=2)
                     + "\n")
        print(f"results in {out}")
    return 0


def checked(entry):
    """Load an entry's dataset description and check it can run its task (class names, templates)."""
    from flame.evaluate.tasks import canonical_task, class_prompts, default_task

    ds = entry.load()
    if (canonical_task(entry.task) if entry.task else default_task(ds)) == "zeroshot_classification":
        class_prompts(ds)
    return ds


def text_side_of(model: str | None, store: str | None) -> dict:
    from flame.model import FlameModel, resolve_model_folder, text_side

    if model and store:
        raise FlameError("--prepare takes --model or --embeddings, not both")
    if model:
        return FlameModel.read_config(resolve_model_folder(model)).get("text") or {}
    if store:
        from flame.store import EmbeddingStore

        return text_side(EmbeddingStore(store).manifest)
    raise FlameError("--prepare needs --model M or --embeddings STORE (the text side to encode with)")


def prepare(args, entries) -> int:
    from flame.distributed import resolve_device
    from flame.evaluate.during import prepare_texts
    from flame.textenc import TextEncoder

    text = text_side_of(args.model, args.embeddings)
    device = args.llm_device or str(resolve_device(args.device))
    encoder = TextEncoder(text, device=device, llm=args.llm, force=args.force_llm)
    try:
        counts = prepare_texts(entries, encoder, text, progress=args.progress)
    finally:
        encoder.unload()
    for label, (n, new, prompts) in counts.items():
        print(f"{label}: {n} texts ({prompts}), {new} newly encoded")
    print(f"text vectors cached in {encoder.cache_dir}")
    return 0


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
    return str(v)


def format_table(results: list[dict]) -> str:
    rows = [("dataset", "task", "lang", "prompts", "metric", "value")]
    for r in results:
        head = (r.get("name", r["dataset"]), r["task"], r["language"], r.get("prompts", "-"))
        for k, v in r["metrics"].items():
            rows.append((*head, k, _fmt(v)))
            head = ("",) * 4
        if r.get("skipped_images"):
            rows.append(("", "", "", "", "skipped images", str(r["skipped_images"])))
    widths = [max(len(str(row[i])) for row in rows) for i in range(6)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
