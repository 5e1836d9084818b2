"""The training loader's reduced-size JPEG decode (issue 15, item 9): the scale is the largest at which
the random-resized crop still covers image_size pixels on each side of the decoded image (so the final
resize never upsamples), every sample keeps its crop, and the output stays within a small error of the
full decode; plus the loader's worker count derived from the CPUs per local rank."""

from __future__ import annotations

import functools
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from flame import distributed
from flame.data.draft import SCALES, draft_scale, oriented_size, request_draft
from flame.data.images import crop_box, load_image


@functools.cache
def photo(w: int, h: int, seed: int = 0, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    """Photo-like content (smooth regions, edges, fine grain; ~1.7 bits/pixel at quality 90)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (h // 40 + 2, w // 40 + 2, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.float64)
    for _ in range(40):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(10, max(11, w // 3)), y0 + rng.integers(10, max(11, h // 3))
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * 0.6 + rng.uniform(0, 255, 3) * 0.4
    grain = rng.normal(128, 40, (h, w)).clip(0, 255).astype(np.uint8)
    tex = np.asarray(Image.fromarray(grain).filter(ImageFilter.GaussianBlur(1.2))).astype(np.float64) - 128
    img += tex[..., None] * 0.5 + rng.normal(0, 2, (h, w, 3))
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    kwargs = {"quality": 90} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    out.save(buf, fmt, **kwargs)
    return buf.getvalue()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("w, h, size, full_box, want", [
    (1600, 1200, 224, True, 4),  # 400x300 still covers 224
    (500, 375, 224, True, 1),    # 250x188: 188 < 224, a full decode
    (4000, 3000, 224, True, 8),
    (1600, 1200, 64, True, 8),
    (1000, 900, 224, True, 4),   # ceil(900 / 4) = 225 >= 224
    (1000, 890, 224, True, 2),   # ceil(890 / 4) = 223 < 224
])
def test_the_scale_chosen_for_given_sizes(w, h, size, full_box, want):
    assert draft_scale(w, h, (0, 0, w, h), size) == want


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
@pytest.mark.parametrize("w, h", [(1600, 1200), (500, 375), (1203, 901)])
def test_every_crop_keeps_at_least_size_pixels_and_no_larger_scale_would(w, h, scale):
    size = 224
    for seed in range(300):
        left, top, bw, bh = crop_box(random.Random(seed), w, h, scale)
        s = draft_scale(w, h, (left, top, left + bw, top + bh), size)
        dw, dh = -(-w // s), -(-h // s)
        assert bw * dw / w >= size or s == 1
        assert bh * dh / h >= size or s == 1
        bigger = [t for t in SCALES if t > s]
        if bigger:  # the next scale up would leave fewer than size pixels on a side
            t = min(bigger)
            assert bw * -(-w // t) / w < size or bh * -(-h // t) / h < size


def test_the_decoder_uses_the_scale_asked_for():
    img = Image.open(io.BytesIO(photo(1600, 1200)))
    assert request_draft(img, 4) == 4
    img.load()
    assert img.size == (400, 300)
    png = Image.open(io.BytesIO(photo(64, 48, fmt="PNG")))
    assert request_draft(png, 4) == 1 and png.size == (64, 48)


@pytest.mark.parametrize("crop", [(0.9, 1.0), (0.08, 1.0)])
def test_reduced_decode_keeps_the_crop_and_is_close_to_the_full_decode(crop):
    data = photo(1600, 1200)
    for seed in range(3):
        r_full, r_red = random.Random(seed), random.Random(seed)
        full = load_image(data, 224, r_full, crop, reduce=False)
        reduced = load_image(data, 224, r_red, crop)
        assert r_full.random() == r_red.random()  # the same draws: the same crop
        assert reduced.shape == full.shape == (3, 224, 224) and reduced.dtype == torch.uint8
        assert psnr(reduced, full) > 38, psnr(reduced, full)
    # the centre resize (no rng) too
    assert psnr(load_image(data, 224, None), load_image(data, 224, None, reduce=False)) > 38


def test_an_exif_rotated_jpeg_is_stood_up_and_cropped_as_in_a_full_decode():
    data = photo(1600, 1200, orientation=6)
    assert oriented_size(Image.open(io.BytesIO(data))) == (1200, 1600)
    for seed in range(2):
        full = load_image(data, 224, random.Random(seed), reduce=False)
        reduced = load_image(data, 224, random.Random(seed))
        assert psnr(reduced, full) > 38


def test_small_jpegs_and_other_formats_decode_exactly_as_before():
    for data in (photo(500, 375), photo(320, 240, fmt="PNG"), photo(320, 240, fmt="PNG", orientation=8)):
        for seed in range(2):
            assert torch.equal(load_image(data, 224, random.Random(seed)),
                               load_image(data, 224, random.Random(seed), reduce=False))


@pytest.mark.parametrize("cpus, local, want", [(2, None, 1), (16, "8", 1), (96, "8", 11), (224, "8", 16),
                                               (256, None, 16), (1, None, 1)])
def test_the_default_loader_workers_come_from_the_cpus_per_local_rank(monkeypatch, cpus, local, want):
    from flame.train.config import TrainConfig

    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert distributed.default_loader_workers() == want
    assert TrainConfig().workers == want  # the flag's default when --workers is not given
    assert TrainConfig(workers=3).workers == 3
