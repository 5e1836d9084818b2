"""The zero-shot protocols of the paper's benchmarks computed by brute force on a model's own vectors
(`model.encode_text(prompts="raw")`, `model.encode_image`), to check `flame eval --benchmark` against,
and small images in the formats the benchmarks are distributed in."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (20, 16)) -> bytes:
    """A small noisy picture (a different one per seed) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    pixels = np.clip(base[None, None] + rng.integers(-60, 60, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, seed: int, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt))
    return path


def image_vectors(model, files) -> torch.Tensor:
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB"))
    return model.encode_image(images)


def class_logits(model, files, names: list[str], templates: list[str]) -> torch.Tensor:
    """100 * cos(image, class) with class = the renormalised mean of its normalised template vectors."""
    prompts = [t.replace("{c}", c) for c in names for t in templates]
    text = model.encode_text(prompts, prompts="raw").view(len(names), len(templates), -1)
    text = text / text.norm(dim=-1, keepdim=True)
    classes = text.mean(dim=1)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    img = image_vectors(model, files)
    img = img / img.norm(dim=-1, keepdim=True)
    return 100 * img @ classes.T


def classification(logits: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """acc1, acc5 and sklearn's balanced accuracy, one image at a time. Ties (ImageNet names two
    classes "crane", so their vectors are equal) fall as in CLIP_benchmark: torch.topk for the
    accuracies, argmax for the recall."""
    from sklearn.metrics import balanced_accuracy_score

    top = [logits[i].topk(min(5, logits.shape[1])).indices.tolist() for i in range(len(labels))]
    acc1 = np.mean([t[0] == y for t, y in zip(top, labels)])
    acc5 = np.mean([y in t for t, y in zip(top, labels)]) if logits.shape[1] >= 5 else None
    pred = [int(logits[i].argmax()) for i in range(len(labels))]
    return {"acc1": float(acc1), "acc5": None if acc5 is None else float(acc5),
            "mean_per_class_recall": float(balanced_accuracy_score(labels, pred))}


def recall_at_1(model, files, captions: list[str]) -> dict[str, float]:
    """1:1 pairs (caption i shows image i): T2I and I2T recall@1 by argmax of each row."""
    text = model.encode_text(captions, prompts="raw")
    img = image_vectors(model, files)
    scores = (text / text.norm(dim=-1, keepdim=True)) @ (img / img.norm(dim=-1, keepdim=True)).T
    n = len(captions)
    t2i = sum(int(scores[i].argmax()) == i for i in range(n)) / n
    i2t = sum(int(scores[:, i].argmax()) == i for i in range(n)) / n
    return {"image_retrieval_recall@1": t2i, "text_retrieval_recall@1": i2t}


def same_metrics(result: dict, expected: dict[str, float], tol: float = 1e-6) -> None:
    """Equal metrics; `tol` allows the float32 means of the runner (a fraction of N items differs by 1/N)."""
    got = result["metrics"]
    assert set(got) == set(expected), (got, expected)
    for k, v in expected.items():
        assert (got[k] is None) if v is None else abs(got[k] - v) <= tol, (k, got[k], v)
