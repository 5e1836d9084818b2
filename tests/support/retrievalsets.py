"""What the retrieval benchmark tests share: small JPEGs, and the protocol computed by brute force
on the model's own vectors (model.encode_text(prompts="long"), model.encode_image), every score
in one matrix, argmax / top-k by hand."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(seed: int, size: tuple[int, int] = (40, 28)) -> bytes:
    """A small JPEG whose content depends on the seed (a colour and a noise pattern)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    pixels = np.clip(base[None, None] + rng.integers(-60, 60, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_jpeg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg(seed))
    return path


def brute_force(model, images: list, captions: list[str], owner: list[int], ks=(1,), first_max: bool = True) -> dict:
    """The protocol by hand: metrics and ties, the score matrix computed whole (texts x images).
    `images`: PIL images or paths/bytes; first_max: recall@1 = first maximal index (argmax)."""
    pil = [im if isinstance(im, Image.Image) else Image.open(io.BytesIO(im) if isinstance(im, bytes) else im)
           for im in images]
    img = model.encode_image([im.convert("RGB") for im in pil])
    txt = model.encode_text(captions, prompts="long")
    s = (txt @ img.T).tolist()
    cols = [list(c) for c in zip(*s)]

    def ranked(row: list[float], k: int) -> list[int]:
        if k == 1 and first_max:
            return [row.index(max(row))]
        return sorted(range(len(row)), key=lambda j: -row[j])[:k]  # ties only matter where there are ties

    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = sum(owner[t] in ranked(r, k) for t, r in enumerate(s)) / len(s)
        metrics[f"text_retrieval_recall@{k}"] = sum(any(owner[t] == i for t in ranked(c, k))
                                                     for i, c in enumerate(cols)) / len(cols)
    ties = {"image_retrieval": sum(r.count(max(r)) > 1 for r in s),
            "text_retrieval": sum(c.count(max(c)) > 1 for c in cols)}
    return {"metrics": metrics, "ties": ties}
