"""The three evaluation tasks and the suite file.

`evaluate(model, ds, task)` returns CLIP_benchmark's result shape:
``{"dataset", "model", "task", "language", "metrics", ...}`` with `task` spelled as CLIP_benchmark
spells it (`zeroshot_classification`, `zeroshot_retrieval`, `linear_probe`) plus what we used
(`prompts`, `images`, `skipped_images`; zero-shot classification also `ties`, the images whose
highest logit another class shares exactly).

Texts go through `text.encode(texts, prompts)` (default: the model's `TextEncoder`, which caches
every vector on disk); images through `images.split_vectors` (cached per model and dataset).

Unreadable images: an evaluation with no readable image, or with more than `max_unreadable`
(MAX_UNREADABLE = 10% by default; `flame eval --max-unreadable`) of a split unreadable, is refused
in one line: metrics on the rest would not be comparable with anyone else's. Below it they are
skipped, counted (`skipped_images`) and warned about.

Prompt sets (FLAME.md section 6), when not chosen: class prompts -> "raw"; captions -> "long" when
they are long (mean length >= LONG_WORDS words), in English, and the model was trained with a
"long" set; otherwise "raw".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flame.config import load_yaml
from flame.errors import FlameError
from flame.evaluate import metrics as M
from flame.evaluate.datasets import EvalDataset, check_not_empty, load_dataset
from flame.evaluate.images import SplitVectors, split_vectors
from flame.evaluate.task_names import MAX_UNREADABLE, PROBE, canonical_task
from flame.evaluate.task_names import TASKS as TASKS  # re-exported: the names live in task_names

log = logging.getLogger("flame.evaluate")

LONG_WORDS = 8  # mean caption length (words) from which a caption set counts as long text
CARVE_TEST = 0.5  # share of a single-split dataset kept for testing a linear probe


def default_task(ds: EvalDataset) -> str:
    return "zeroshot_retrieval" if ds.kind == "retrieval" else "zeroshot_classification"


def trained_sets(text: dict) -> set[str]:
    return {d.get("name") for d in text.get("prompt_sets") or [] if isinstance(d, dict)} | {
        f.split("/")[0] for f in text.get("facets") or []
    }


def default_prompts(task: str, ds: EvalDataset, text: dict) -> str:
    if task != "zeroshot_retrieval":
        return "raw"
    caps = [c for it in ds.items("test") for c in it.captions]
    mean_words = sum(len(c.split()) for c in caps) / max(1, len(caps))
    english = (ds.language or "en") == "en"
    return "long" if mean_words >= LONG_WORDS and english and "long" in trained_sets(text) else "raw"


def class_prompts(ds: EvalDataset) -> list[str]:
    """Every class under every template, class-major ([c0 t0, c0 t1, ..., c1 t0, ...])."""
    if ds.template_error:
        raise FlameError(ds.template_error)
    return [t.replace("{c}", c) for c in ds.classnames for t in ds.templates]


def texts_needed(ds: EvalDataset, task: str) -> list[str]:
    """The texts a task encodes (what `--prepare` caches)."""
    if task == "zeroshot_classification":
        return class_prompts(ds)
    if task == "zeroshot_retrieval":
        return [c for it in ds.items("test") for c in it.captions]
    return []


def _model_name(model) -> str:
    return str(getattr(model, "source", None) or "in-memory")


def evaluate(
    model,
    ds: EvalDataset,
    task: str | None = None,
    prompts: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    cache_dir: str | Path | None | bool = None,
    progress: bool = True,
    text=None,
    max_unreadable: float = MAX_UNREADABLE,
    probe: dict | None = None,
) -> dict:
    """Run one task on one dataset. `text`: anything with encode(texts, prompts) (default the
    model's TextEncoder); `cache_dir=False` turns the image-vector cache off; `max_unreadable`:
    the share of a split's images that may be unreadable (module docstring); `probe`: the linear
    probe's settings (`PROBE`'s keys)."""
    task = canonical_task(task) if task else default_task(ds)
    if task == "zeroshot_retrieval" and ds.kind != "retrieval":
        raise FlameError(f"{ds.path} is a classification set; use zeroshot-classification or linear-probe")
    if task != "zeroshot_retrieval" and ds.kind != "classification":
        raise FlameError(f"{ds.path} is a caption set; use retrieval")
    check_not_empty(ds)
    text = text if text is not None else model.text_encoder
    prompts = prompts or default_prompts(task, ds, getattr(model, "text", {}) or {})
    img = dict(batch_size=batch_size, workers=workers, cache_dir=cache_dir, progress=progress,
               max_unreadable=max_unreadable)
    result = {"dataset": ds.name, "model": _model_name(model), "task": task, "language": ds.language or "en"}
    if task == "zeroshot_classification":
        labels = [it.label for it in ds.items("test")]
        if labels and max(labels) >= len(ds.classnames):
            raise FlameError(f"{ds.name}: label {max(labels)} but only {len(ds.classnames)} class names")
        # texts first: class-name, template and LLM errors come before any image is decoded
        emb = text.encode(class_prompts(ds), prompts=prompts, progress=progress)
        vec = _readable(model, ds, "test", "embed", img)
        classes = M.class_vectors(emb.view(len(ds.classnames), len(ds.templates), -1))
        labels = torch.tensor(labels)
        logits = M.zeroshot_logits(vec.vectors[vec.ok], classes)
        metrics = M.classification_metrics(logits, labels[vec.ok])
        result.update(prompts=prompts, templates=len(ds.templates), classes=len(ds.classnames),
                      ties=M.top1_ties(logits))
    elif task == "zeroshot_retrieval":
        items = ds.items("test")
        emb = text.encode([c for it in items for c in it.captions], prompts=prompts, progress=progress)
        vec = _readable(model, ds, "test", "embed", img)
        # an unreadable image leaves the evaluation with its captions
        rows = torch.tensor([bool(vec.ok[i]) for i, it in enumerate(items) for _ in it.captions], dtype=torch.bool)
        keep = [i for i in range(len(items)) if vec.ok[i]]
        owner = [j for j, i in enumerate(keep) for _ in items[i].captions]
        # no copy of the caption vectors: normalised in place (they are ours), rows picked by index
        metrics = M.retrieval_metrics(vec.vectors[keep] if len(keep) < len(items) else vec.vectors, emb, owner,
                                      device=getattr(model, "device", None), overwrite=True,
                                      text_rows=None if bool(rows.all()) else torch.nonzero(rows).flatten())
        result.update(prompts=prompts, captions=len(owner))
    else:
        metrics, vec, split = _linear_probe(model, ds, img, {**PROBE, **(probe or {})})
        result.update(probe=metrics.pop("probe"))
        result.update(split=split)
    result["metrics"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    result.update(images=int(vec.ok.numel()), skipped_images=vec.skipped)
    if getattr(model, "precision", None):  # the tower's: fp32 on the CPU, bf16/tf32 on CUDA
        result["precision"] = model.precision
    if vec.skipped:
        log.warning("%s: %d unreadable image(s) skipped", ds.name, vec.skipped)
    return result


def _readable(model, ds: EvalDataset, split: str, kind: str, img: dict) -> SplitVectors:
    """split_vectors, refused in one line when none, or more than img["max_unreadable"], of the
    split's images could be read."""
    img = dict(img)
    limit = img.pop("max_unreadable")
    vec = split_vectors(model, ds, split, kind, **img)
    n, bad = int(vec.ok.numel()), vec.skipped
    if n == 0:
        raise FlameError(f"{ds.name}: the {split} split has no images; nothing to evaluate")
    if bad == n:
        raise FlameError(f"{ds.name}: none of the {n} {split} images could be read (only regular JPEG/PNG/WEBP/"
                         "BMP files are decoded); nothing to evaluate")
    if bad > limit * n:
        need = math.ceil(100 * bad / n) / 100
        raise FlameError(f"{ds.name}: {bad} of the {n} {split} images ({bad / n:.0%}) could not be read, more than "
                         f"the {limit:.0%} allowed; fix the set or pass --max-unreadable {need:.2f}")
    return vec




def _ok_rows(vec: SplitVectors) -> np.ndarray:
    return torch.nonzero(vec.ok).flatten().numpy()


def _linear_probe(model, ds: EvalDataset, img: dict, probe: dict):
    """The probe on the tower's pooled features; rows are picked by index (no copy of the
    features) and, for clip-benchmark, streamed from the image cache's memory maps."""
    from flame.evaluate.probe import Picked, clip_benchmark_probe

    test = _readable(model, ds, "test", "features", img)
    y_test = np.array([it.label for it in ds.items("test")], dtype=np.int64)
    if "train" in ds.splits:
        train = _readable(model, ds, "train", "features", img)
        y_train = np.array([it.label for it in ds.items("train")], dtype=np.int64)
        tr, te = _ok_rows(train), _ok_rows(test)
        xtr, ytr, xte, yte = Picked(train.vectors, tr), y_train[tr], Picked(test.vectors, te), y_test[te]
        split, vec = "train/test", _joined(train, test)
    else:  # one split: a seeded stratified half is the probe's training set
        ok = _ok_rows(test)
        rest, carved = M.stratified_split(torch.from_numpy(y_test[ok]), CARVE_TEST, seed=0)
        tr, te = ok[rest.numpy()], ok[carved.numpy()]
        xtr, ytr, xte, yte = Picked(test.vectors, tr), y_test[tr], Picked(test.vectors, te), y_test[te]
        split, vec = f"carved {1 - CARVE_TEST:.0%}/{CARVE_TEST:.0%} from test", test
    if len(yte) == 0 or len(np.unique(ytr)) < 2:
        raise FlameError(f"{ds.name}: too few readable images for a linear probe")
    if probe["method"] == "lbfgs":
        metrics = M.linear_probe(torch.from_numpy(xtr[:]), torch.from_numpy(ytr), torch.from_numpy(xte[:]),
                                 torch.from_numpy(yte), device=getattr(model, "device", None))
        return {**metrics, "probe": {"method": "lbfgs"}}, vec, split
    val = {}
    if probe["val_split"]:
        v = _readable(model, ds, probe["val_split"], "features", img)
        y_val = np.array([it.label for it in ds.items(probe["val_split"])], dtype=np.int64)
        val = {"val_x": Picked(v.vectors, _ok_rows(v)), "val_y": y_val[_ok_rows(v)]}
    metrics = clip_benchmark_probe(xtr, ytr, xte, yte, **val, lr=probe["lr"], epochs=probe["epochs"],
                                   batch_size=probe["batch_size"], seed=probe["seed"],
                                   val_proportion=probe["val_proportion"], device=getattr(model, "device", None))
    # the metrics as CLIP_benchmark names them; the protocol it records beside them goes in "probe"
    setup = {k: metrics.pop(k) for k in ("epochs", "seed", "fewshot_k", "normalized")}
    setup.update(method="clip-benchmark", lr=probe["lr"], batch_size=probe["batch_size"],
                 validation=probe["val_split"] or (f"{probe['val_proportion']:g} of train"
                                                   if probe["val_proportion"] else None))
    return {**metrics, "probe": setup}, vec, split


def _joined(a: SplitVectors, b: SplitVectors) -> SplitVectors:
    return SplitVectors(torch.cat([a.vectors, b.vectors]), torch.cat([a.ok, b.ok]))


# ------------------------------------------------------------------------------------------------
# suites
# ------------------------------------------------------------------------------------------------
@dataclass
class SuiteEntry:
    dataset: str
    task: str | None = None
    language: str | None = None
    prompts: str | None = None
    name: str | None = None  # label in results / logs (default: the dataset's name)
    dataset_name: str | None = None  # CLIP_benchmark's name for the multilingual class-name lookup
    templates: str | None = None

    def load(self) -> EvalDataset:
        return load_dataset(self.dataset, self.task, self.language, self.dataset_name, self.templates)

    def label(self, ds: EvalDataset) -> str:
        if self.name:
            return self.name
        lang = f"-{ds.language}" if self.language else ""
        return f"{ds.name}{lang}"


class Suite:
    """A YAML list of {dataset, task?, language?, prompts?, name?, dataset_name?, templates?};
    relative dataset paths are read from the suite file's folder."""

    def __init__(self, entries: Sequence[SuiteEntry]):
        self.entries = list(entries)

    @classmethod
    def from_file(cls, path: str | Path) -> Suite:
        path = Path(path)
        raw = load_yaml(path, "suite file")
        if isinstance(raw, dict) and "datasets" in raw:
            raw = raw["datasets"]
        if not isinstance(raw, list) or not raw:
            raise FlameError(f"{path} must hold a list of {{dataset, task, language?, prompts?, name?}}")
        keys = set(SuiteEntry.__dataclass_fields__)
        entries = []
        for n, e in enumerate(raw, 1):
            if isinstance(e, str):
                e = {"dataset": e}
            if not isinstance(e, dict) or "dataset" not in e:
                raise FlameError(f"{path}: entry {n} needs a 'dataset'")
            unknown = set(e) - keys
            if unknown:
                raise FlameError(f"{path}: entry {n} has unknown key {sorted(unknown)[0]!r} "
                                 f"(known: {', '.join(sorted(keys))})")
            e = {k: (str(v) if v is not None else None) for k, v in e.items()}
            if not Path(e["dataset"]).expanduser().is_absolute():
                e["dataset"] = str(path.parent / e["dataset"])
            if e.get("task"):
                canonical_task(e["task"])
            entries.append(SuiteEntry(**e))
        return cls(entries)

    def to_list(self) -> list[dict]:
        return [asdict(e) for e in self.entries]
