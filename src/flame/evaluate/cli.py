"""`flame eval`: zero-shot classification, retrieval and linear probes in CLIP_benchmark's conventions.

    flame eval --model RUN --task zeroshot-classification --dataset wds_imagenet1k [--language it]
    flame eval --model RUN --task retrieval --dataset captions.jsonl [--prompts long] --output r.json
    flame eval --model RUN --suite suite.yaml --output results.json
    flame eval --model RUN --suite paper --data-root DATA --output paper.json
    flame eval --prepare --suite suite.yaml (--model RUN | --embeddings STORE) [--llm SPEC]

`--prepare` computes and caches every class-prompt and caption vector the suite needs (one LLM
load) without evaluating, e.g. before `flame train --eval suite.yaml`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from flame.config import at_least, setting
from flame.errors import FlameError
from flame.evaluate.task_names import MAX_UNREADABLE, PROBE, canonical_task

PAPER = "paper"  # --suite paper (flame.evaluate.benchmark.suite.PAPER)

log = logging.getLogger("flame.evaluate")

DESCRIPTION = (
    "Evaluate a FLAME model: zero-shot classification, image-text retrieval or a linear probe, on the "
    "CLIP_benchmark webdataset layout, a class-folder image set or a CSV/JSONL caption table. "
    "Metrics and JSON as CLIP_benchmark defines them."
)
EPILOG = """\
examples:
  flame eval --model RUN --task zeroshot-classification --dataset wds_imagenet1k [--language it]
  flame eval --model RUN --task retrieval --dataset captions.jsonl [--prompts long] --output r.json
  flame eval --model RUN --suite suite.yaml --output results.json
  flame eval --model RUN --benchmark urban-1k --dataset DATA/Urban1k --output urban.json
  flame eval --model RUN --suite paper --data-root DATA --output paper.json
  flame eval --prepare --suite suite.yaml (--model RUN | --embeddings STORE) [--llm SPEC]
"""


@dataclass
class Config:
    """`flame eval` settings; `check()` holds the rules between them."""

    model: str | None = setting(None, metavar="M", group="what",
                                help="run folder (latest checkpoint), checkpoint/model folder, or Hugging Face repo "
                                     "ORG/NAME or hf-hub:ORG/NAME[@REV]")
    task: str | None = setting(None, group="what", shown="by the dataset",
                               help="zeroshot-classification | retrieval | linear-probe")
    dataset: str | None = setting(None, metavar="PATH", group="what", help="dataset folder or CSV/JSONL file")
    benchmark: str | None = setting(None, metavar="NAME", group="what",
                                    help="one of the paper's benchmarks as distributed (EVAL.md), read from "
                                         "--dataset ROOT with its own protocol; see the README for the names")
    allow_missing: bool = setting(False, group="what",
                                  help="--benchmark: evaluate the images that are there (recorded in the results) "
                                       "instead of refusing an incomplete set")
    suite: str | None = setting(None, metavar="FILE", group="what",
                                help="YAML list of {dataset, task, language?, prompts?, name?, dataset_name?, "
                                     "templates?}; `paper`: every paper benchmark found under --data-root")
    data_root: str | None = setting(None, metavar="DIR", group="what",
                                    help="--suite paper: the folder holding the benchmarks, each in its distributed "
                                         "folder name (see the README); the report goes to --output FILE (JSON) "
                                         "with FILE.md and FILE.png beside it")
    language: str | None = setting(None, group="texts", shown="en; tables: all rows",
                                   help="class-name / caption language")
    dataset_name: str | None = setting(None, group="texts", shown="the folder name without wds_",
                                       help="CLIP_benchmark's name of the dataset (for shipped multilingual "
                                            "class names)")
    templates: str | None = setting(None, metavar="FILE|NAME", group="texts",
                                    help="zero-shot templates when the dataset has none: a file ({c} per line) "
                                         "or a shipped set")
    prompts: str | None = setting(None, group="texts",
                                  shown="raw for class prompts and short captions, long for long English captions",
                                  help="raw | short | long | a prompt-set file")
    output: str | None = setting(None, metavar="FILE", group="what",
                                 help="write the results as JSON (a list for a suite)")
    batch_size: int = setting(64, check=at_least(1), group="running", help="images per batch")
    workers: int = setting(2, check=at_least(0), group="running", help="image-decoding DataLoader workers")
    device: str = setting("auto", group="running", help="where the image tower runs: auto, cpu, cuda")
    llm: str | None = setting(None, metavar="SPEC", group="texts",
                              help="LLM to load instead of the recorded one (same weights)")
    llm_device: str | None = setting(None, group="texts", shown="--device",
                                     help="where the LLM runs when texts are not cached")
    force_llm: bool = setting(False, group="texts",
                              help="accept an LLM whose weight fingerprint differs from the model's")
    prepare: bool = setting(False, group="what", help="only compute and cache the suite's text vectors")
    embeddings: str | None = setting(None, metavar="STORE", group="what",
                                     help="--prepare: take the text side from this embedding store")
    progress: bool = setting(True, negate="--no-progress", group="running", help="no progress bars")
    max_unreadable: float = setting(MAX_UNREADABLE, metavar="FRACTION", group="running",
                                    check=(lambda v: 0 <= v <= 1, "must be between 0 and 1"),
                                    help="share of a split's images that may be unreadable (skipped and counted); "
                                         "more is refused")
    # --- linear probe (issue 16.4): CLIP_benchmark's protocol by default, the L-BFGS fit on request
    probe: str = setting(PROBE["method"], choices=("clip-benchmark", "lbfgs"), group="linear probe",
                         help="clip-benchmark: a linear layer trained with AdamW and a cosine lr (CLIP_benchmark's "
                              "protocol); lbfgs: L-BFGS logistic regression with a weight-decay search on a "
                              "stratified 20%% of train")
    probe_lr: float = setting(PROBE["lr"], check=(lambda v: v > 0, "must be > 0"), group="linear probe",
                              help="clip-benchmark: the AdamW learning rate (CLIP_benchmark's --fewshot_lr)")
    probe_epochs: int = setting(PROBE["epochs"], check=at_least(1), group="linear probe",
                                help="clip-benchmark: epochs (--fewshot_epochs)")
    probe_batch_size: int = setting(PROBE["batch_size"], check=at_least(1), group="linear probe",
                                    help="clip-benchmark: features per batch (--batch_size)")
    probe_val_split: str | None = setting(None, metavar="SPLIT", group="linear probe", shown="none",
                                          help="clip-benchmark: search the weight decay on this split of the "
                                               "dataset (--val_split); without it wd is 0, as the release ran")
    probe_val_proportion: float | None = setting(
        None, metavar="P", group="linear probe", shown="none",
        check=(lambda v: v is None or 0 < v < 1, "must be between 0 and 1"),
        help="clip-benchmark: search the weight decay on a random share P of train (--val_proportion)")
    probe_seed: int = setting(PROBE["seed"], group="linear probe", help="the probe's seed (CLIP_benchmark's --seed)")

    def check(self) -> None:
        """The rules between settings, all before a dataset, model or LLM is read."""
        if self.task:
            canonical_task(self.task)
        if self.probe_val_split and self.probe_val_proportion:
            raise FlameError("give --probe-val-split or --probe-val-proportion, not both")
        if self.data_root and self.suite != PAPER:
            raise FlameError(f"--data-root DIR is for --suite {PAPER}")
        if self.suite == PAPER:
            self._check_paper()
            return
        if self.allow_missing and not self.benchmark:
            raise FlameError(f"--allow-missing is for --benchmark NAME or --suite {PAPER}")
        if self.benchmark:
            self._check_benchmark()
            return
        if self.suite and self.dataset:
            raise FlameError("give --dataset or --suite, not both")
        if not self.suite and not self.dataset:
            raise FlameError("--dataset PATH (or --suite FILE) is required")
        if not self.prepare:
            if not self.model:
                raise FlameError("--model is required (a run folder or a checkpoint folder)")
            return
        if self.model and self.embeddings:
            raise FlameError("--prepare takes --model or --embeddings, not both")
        if not self.model and not self.embeddings:
            raise FlameError("--prepare needs --model M or --embeddings STORE (the text side to encode with)")

    def _check_paper(self) -> None:
        if self.benchmark or self.dataset or self.prepare:
            raise FlameError(f"--suite {PAPER} runs on its own: not with --benchmark, --dataset or --prepare")
        if not self.data_root:
            raise FlameError(f"--suite {PAPER} needs --data-root DIR (the folder holding the benchmarks)")
        if self.output and Path(self.output).suffix.lower() in (".md", ".png"):
            raise FlameError(f"--suite {PAPER} --output FILE names the JSON (FILE.md and FILE.png go beside it): "
                             "give e.g. paper.json")
        if not self.model:
            raise FlameError("--model is required (a run folder or a checkpoint folder)")

    def _check_benchmark(self) -> None:
        from flame.evaluate.benchmark import get

        get(self.benchmark)
        if self.suite or self.prepare:
            raise FlameError("--benchmark NAME runs on its own: not with --suite or --prepare")
        if not self.dataset:
            raise FlameError(f"--benchmark {self.benchmark} needs --dataset ROOT (the benchmark as distributed)")
        if not self.model:
            raise FlameError("--model is required (a run folder or a checkpoint folder)")


def _entries(cfg: Config) -> list:
    from flame.evaluate.tasks import Suite, SuiteEntry

    if not cfg.suite:
        return [SuiteEntry(cfg.dataset, cfg.task, cfg.language, cfg.prompts, None, cfg.dataset_name, cfg.templates)]
    entries = Suite.from_file(cfg.suite).entries
    for e in entries:
        e.language = e.language or cfg.language
        e.prompts = e.prompts or cfg.prompts
        e.task = e.task or cfg.task
    return entries


def check_output(output: str | None) -> None:
    """An `--output` that cannot be written is found before any work (not after hours of it):
    its folder is made and a file is created there and removed."""
    import os
    import tempfile

    if not output:
        return
    out = Path(output)
    if out.is_dir():
        raise FlameError(f"--output {out} is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FlameError(f"cannot write --output {out}: {e.strerror or e}") from None


def main(cfg: Config) -> int:
    check_output(cfg.output)
    if cfg.benchmark:
        return run_benchmark(cfg)
    if cfg.suite == PAPER:
        return run_paper(cfg)
    entries = _entries(cfg)
    if cfg.prepare:
        return prepare(cfg, entries)
    results = run_entries(cfg, entries)
    print(format_table(results))
    write_results(cfg, results[0] if len(results) == 1 and not cfg.suite else results)
    return 0


def load_model(cfg: Config):
    from flame.distributed import resolve_device
    from flame.model import FlameModel

    device = resolve_device(cfg.device)
    return FlameModel.from_pretrained(cfg.model, device=device, llm=cfg.llm,
                                      llm_device=cfg.llm_device or str(device), force_llm=cfg.force_llm)


def write_results(cfg: Config, results) -> None:
    if cfg.output:
        from flame.fileio import write_atomic

        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(results, indent=2) + "\n")
        print(f"results in {out}")


def benchmark_options(cfg: Config):
    from flame.evaluate.benchmark import Options

    languages = tuple(x.strip() for x in (cfg.language or "").split(",") if x.strip())  # "en, jp" too
    return Options(allow_missing=cfg.allow_missing, batch_size=cfg.batch_size, workers=cfg.workers,
                   progress=cfg.progress, max_unreadable=cfg.max_unreadable, languages=languages or None)


def run_paper(cfg: Config) -> int:
    """`--suite paper`: every benchmark found under --data-root read and checked, then one model
    load; the report is rewritten after each benchmark, so a later failure keeps the finished ones."""
    from flame.evaluate.benchmark import get, read_benchmark, report
    from flame.evaluate.benchmark.suite import find

    opts = benchmark_options(cfg)
    found, skipped = find(cfg.data_root)
    for s in skipped:
        print(f"skipped {s['benchmark']}: no {s['folder']}/ under {cfg.data_root}")
    data = [(name, read_benchmark(name, root, opts)) for name, root in found]
    model = load_model(cfg)
    results: dict[str, list[dict]] = {}
    for name, d in data:
        results[name] = [{"benchmark": name, **r} for r in get(name).evaluate(model, d, opts)]
        if cfg.output:
            report.write(report.build(results, cfg.model, cfg.data_root, skipped), cfg.output, plot_it=False)
    model.text_encoder.unload()
    rep = report.build(results, cfg.model, cfg.data_root, skipped)
    print(report.markdown(rep))
    if cfg.output:
        where = report.write(rep, cfg.output)
        print(f"report in {where['json']}, {where['md'].name} and {where['png'].name}")
    return 0


def run_benchmark(cfg: Config) -> int:
    """`--benchmark NAME`: the set read and checked in full, then one model load."""
    from flame.evaluate.benchmark import get, read_benchmark

    opts = benchmark_options(cfg)
    data = read_benchmark(cfg.benchmark, cfg.dataset, opts)
    model = load_model(cfg)
    results = [{"benchmark": cfg.benchmark, **r} for r in get(cfg.benchmark).evaluate(model, data, opts)]
    model.text_encoder.unload()
    print(format_table(results))
    write_results(cfg, results)
    return 0


def run_entries(cfg: Config, entries: list) -> list[dict]:
    """Every entry's result (CLIP_benchmark's shape plus `name`), with one model load."""
    from flame.evaluate.tasks import evaluate

    datasets = [checked(e) for e in entries]  # every dataset problem before the model is loaded
    model = load_model(cfg)
    results = []
    for e, ds in zip(entries, datasets):
        result = evaluate(model, ds, e.task, e.prompts, batch_size=cfg.batch_size, workers=cfg.workers,
                          progress=cfg.progress, max_unreadable=cfg.max_unreadable, probe=probe_options(cfg))
        result["name"] = e.label(ds)
        results.append(result)
    model.text_encoder.unload()
    return results


def probe_options(cfg: Config) -> dict:
    """The linear probe's settings, as `tasks.evaluate(probe=...)` takes them."""
    return {"method": cfg.probe, "lr": cfg.probe_lr, "epochs": cfg.probe_epochs, "batch_size": cfg.probe_batch_size,
            "val_split": cfg.probe_val_split, "val_proportion": cfg.probe_val_proportion, "seed": cfg.probe_seed}


def checked(entry):
    """Load an entry's dataset description and check it can run its task (class names, templates)."""
    from flame.evaluate.datasets import check_not_empty
    from flame.evaluate.tasks import class_prompts, default_task

    ds = entry.load()
    check_not_empty(ds)
    if (canonical_task(entry.task) if entry.task else default_task(ds)) == "zeroshot_classification":
        class_prompts(ds)
    return ds


def text_side_of(model: str | None, store: str | None) -> dict:
    """The text side to encode with: the model's, else the embedding store's (`Config.check`
    lets exactly one through)."""
    from flame.model import FlameModel, model_folder, text_side
    from flame.store import EmbeddingStore

    if model:
        return FlameModel.read_config(model_folder(model)).get("text") or {}
    return text_side(EmbeddingStore(store).manifest)


def prepare(cfg: Config, entries: list) -> int:
    from flame.distributed import resolve_device
    from flame.evaluate.during import prepare_texts
    from flame.textenc import TextEncoder

    text = text_side_of(cfg.model, cfg.embeddings)
    device = cfg.llm_device or str(resolve_device(cfg.device))
    encoder = TextEncoder(text, device=device, llm=cfg.llm, force=cfg.force_llm)
    try:
        counts = prepare_texts(entries, encoder, text, progress=cfg.progress)
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
