"""A small, honest generated image-caption set: coloured shapes on noisy backgrounds.

Every image shows one shape of one colour at one position, with random size, jitter,
background tint and pixel noise; its caption states exactly those three attributes
("a red triangle at the top left"). Written as webdataset tar shards in the img2dataset
layout (`KEY.jpg`, `KEY.txt`, `KEY.json`), so it runs through the same `flame embed` /
`flame train` path as real data. Held-out images of the same caption combinations test
whether a tower learned to *see* colour, shape and position.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}


@dataclass(frozen=True)
class Combo:
    color: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.color} {self.shape} {where}"


def combos(colors=None, shapes=None, positions=None) -> list[Combo]:
    return [
        Combo(c, s, p)
        for c in (colors or list(COLORS))
        for s in (shapes or list(SHAPES))
        for p in (positions or list(POSITIONS))
    ]


def render(combo: Combo, rng: random.Random, size: int = 64) -> Image.Image:
    bg = tuple(int(v) for v in (rng.randint(90, 200), rng.randint(90, 200), rng.randint(90, 200)))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    cx, cy = POSITIONS[combo.position]
    cx = (cx + rng.uniform(-0.06, 0.06)) * size
    cy = (cy + rng.uniform(-0.06, 0.06)) * size
    r = rng.uniform(0.12, 0.19) * size
    jitter = lambda v: max(0, min(255, v + rng.randint(-25, 25)))
    fill = tuple(jitter(v) for v in COLORS[combo.color])
    if combo.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif combo.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif combo.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        w = r / 2.5
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    noise = Image.effect_noise((size, size), rng.uniform(8, 20)).convert("RGB")
    img = Image.blend(img, noise, 0.12)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return img


def sample(index: int, seed: int = 0, size: int = 64, pool: list[Combo] | None = None) -> tuple[Image.Image, Combo]:
    """Sample `index` of the set with `seed`: a deterministic (image, combo) pair."""
    pool = pool or combos()
    rng = random.Random(seed * 1_000_003 + index)
    combo = pool[rng.randrange(len(pool))]
    return render(combo, rng, size), combo


def write_shards(
    out_dir: str | Path,
    n: int,
    *,
    shard_size: int = 256,
    size: int = 64,
    seed: int = 0,
    prefix: str = "shapes",
    pool: list[Combo] | None = None,
    quality: int = 92,
) -> list[Path]:
    """Write `n` samples as `{prefix}-{i:05d}.tar` shards into `out_dir`; return their paths.
    Keys are `{seed:03d}{index:08d}` (unique across seeds). Each shard is written to a temporary
    name and renamed, so a crash never leaves a truncated shard."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool = pool or combos()
    paths = []
    for s, start in enumerate(range(0, n, shard_size)):
        path = out / f"{prefix}-{s:05d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for i in range(start, min(n, start + shard_size)):
                img, combo = sample(i, seed, size, pool)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=quality)
                meta = {"color": combo.color, "shape": combo.shape, "position": combo.position}
                sink.write({"__key__": f"{seed:03d}{i:08d}", "jpg": buf.getvalue(), "txt": combo.caption,
                            "json": json.dumps(meta).encode()})
        os.replace(tmp, path)
        paths.append(path)
    return paths
