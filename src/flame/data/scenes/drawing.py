"""Drawing one 64x64 image of a scene: background by atmosphere, two patterned objects, noise."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from flame.data.scenes.vocabulary import COLOURS, MINOR_RADIUS, POSITIONS, SIZES, Scene
from flame.errors import FlameError


def _star(m, d, x, y, r):
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        a = math.radians(-90 + 36 * k)
        pts.append((x + rad * math.cos(a), y + 0.1 * r + rad * math.sin(a)))
    m.polygon(pts, fill=255)


def _heart(m, d, x, y, r):
    s = r / 16.5
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        hx = 16 * math.sin(t) ** 3
        hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x + s * hx, y - s * hy - 2.5 * s))
    m.polygon(pts, fill=255)


def _house(m, d, x, y, r):
    m.rectangle([x - 0.72 * r, y - 0.1 * r, x + 0.72 * r, y + 0.9 * r], fill=255)
    m.polygon([(x - 0.98 * r, y - 0.05 * r), (x, y - 0.95 * r), (x + 0.98 * r, y - 0.05 * r)], fill=255)
    d.rectangle([x - 0.17 * r, y + 0.35 * r, x + 0.17 * r, y + 0.9 * r], fill=255)


def _tree(m, d, x, y, r):
    m.ellipse([x - 0.8 * r, y - r, x + 0.8 * r, y + 0.4 * r], fill=255)
    d.rectangle([x - 0.17 * r, y + 0.35 * r, x + 0.17 * r, y + r], fill=255)


def _car(m, d, x, y, r):
    m.rectangle([x - r, y - 0.05 * r, x + r, y + 0.5 * r], fill=255)
    m.polygon([(x - 0.55 * r, y), (x - 0.3 * r, y - 0.55 * r), (x + 0.35 * r, y - 0.55 * r), (x + 0.6 * r, y)],
              fill=255)
    for cx in (x - 0.55 * r, x + 0.55 * r):
        d.ellipse([cx - 0.28 * r, y + 0.3 * r, cx + 0.28 * r, y + 0.86 * r], fill=255)


def _boat(m, d, x, y, r):
    m.polygon([(x - r, y + 0.2 * r), (x + r, y + 0.2 * r), (x + 0.62 * r, y + 0.75 * r), (x - 0.62 * r, y + 0.75 * r)],
              fill=255)
    m.polygon([(x, y - r), (x, y + 0.08 * r), (x + 0.75 * r, y + 0.08 * r)], fill=255)
    d.line([(x - 0.08 * r, y - r), (x - 0.08 * r, y + 0.2 * r)], fill=255, width=max(1, round(0.14 * r)))


def _cup(m, d, x, y, r):
    m.polygon([(x - 0.7 * r, y - 0.6 * r), (x + 0.45 * r, y - 0.6 * r), (x + 0.35 * r, y + 0.75 * r),
               (x - 0.6 * r, y + 0.75 * r)], fill=255)
    m.ellipse([x + 0.2 * r, y - 0.35 * r, x + 0.95 * r, y + 0.4 * r], outline=255, width=max(1, round(0.2 * r)))


def _flower(m, d, x, y, r):
    cy = y - 0.15 * r
    for k in range(5):
        a = math.radians(-90 + 72 * k)
        px, py = x + 0.52 * r * math.cos(a), cy + 0.52 * r * math.sin(a)
        m.ellipse([px - 0.38 * r, py - 0.38 * r, px + 0.38 * r, py + 0.38 * r], fill=255)
    d.ellipse([x - 0.22 * r, cy - 0.22 * r, x + 0.22 * r, cy + 0.22 * r], fill=255)
    d.line([(x, cy + 0.6 * r), (x, y + r)], fill=255, width=max(1, round(0.12 * r)))


def _moon(m, d, x, y, r):
    m.ellipse([x - r, y - r, x + r, y + r], fill=255)
    ox, oy, orad = x + 0.5 * r, y - 0.25 * r, 0.85 * r
    m.ellipse([ox - orad, oy - orad, ox + orad, oy + orad], fill=0)


def _fish(m, d, x, y, r):
    m.ellipse([x - 0.8 * r, y - 0.48 * r, x + 0.45 * r, y + 0.48 * r], fill=255)
    m.polygon([(x + 0.3 * r, y), (x + r, y - 0.55 * r), (x + r, y + 0.55 * r)], fill=255)
    d.ellipse([x - 0.55 * r, y - 0.2 * r, x - 0.35 * r, y], fill=255)


SHAPES: dict[str, Callable] = {
    "star": _star, "heart": _heart, "house": _house, "tree": _tree, "car": _car,
    "boat": _boat, "cup": _cup, "flower": _flower, "moon": _moon, "fish": _fish,
}
SCALE = 2  # objects are drawn at twice the resolution and downsampled (smooth edges)


def _pattern(rgb: tuple[int, int, int], pattern: str, n: int, rng: random.Random) -> Image.Image:
    base = np.array(rgb, dtype=np.float32)
    light = base * 0.45 + 255 * 0.55
    yy, xx = np.mgrid[0:n, 0:n]
    ox, oy = rng.randrange(12), rng.randrange(12)
    if pattern == "striped":
        on = ((xx + yy + ox) // 6) % 2 == 0
    elif pattern == "dotted":
        on = (((xx + ox) % 10 - 5) ** 2 + ((yy + oy) % 10 - 5) ** 2) <= 6.5
    elif pattern == "checkered":
        on = (((xx + ox) // 8 + (yy + oy) // 8) % 2) == 0
    else:
        on = np.zeros((n, n), dtype=bool)
    arr = np.where(on[..., None], light, base)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def _jitter(rgb, rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)


def _gradient(n: int, top, bottom) -> np.ndarray:
    t = np.linspace(0, 1, n, dtype=np.float32)[:, None, None]
    col = np.array(top, np.float32) * (1 - t) + np.array(bottom, np.float32) * t
    return np.broadcast_to(col, (n, n, 3)).copy()


def _background(atm: str, n: int, rng: random.Random) -> Image.Image:
    j = lambda c: _jitter(c, rng, 12)  # noqa: E731
    if atm == "sunny":
        img = Image.fromarray(_gradient(n, j((90, 160, 235)), j((175, 215, 250))).astype(np.uint8))
        d = ImageDraw.Draw(img)
        sx = rng.choice((0.13, 0.87)) * n
        sy, sr = 0.13 * n, 0.08 * n
        d.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=(255, 235, 120))
    elif atm == "night":
        img = Image.fromarray(_gradient(n, j((8, 12, 40)), j((28, 32, 75))).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(rng.randint(10, 18)):
            px, py = rng.uniform(0, n), rng.uniform(0, n)
            d.ellipse([px - 1, py - 1, px + 1, py + 1], fill=(230, 230, 200))
    elif atm == "rainy":
        img = Image.fromarray(_gradient(n, j((95, 100, 112)), j((140, 145, 155))).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(rng.randint(25, 35)):
            px, py = rng.uniform(-10, n), rng.uniform(-10, n)
            d.line([(px, py), (px + 5, py + 12)], fill=(190, 195, 210), width=1)
    elif atm == "foggy":
        img = Image.fromarray(_gradient(n, j((200, 200, 205)), j((170, 172, 178))).astype(np.uint8))
    elif atm == "snowy":
        img = Image.fromarray(_gradient(n, j((150, 165, 190)), j((200, 210, 225))).astype(np.uint8))
        d = ImageDraw.Draw(img)
        d.rectangle([0, 0.85 * n, n, n], fill=(245, 245, 250))
    elif atm == "sunset":
        img = Image.fromarray(_gradient(n, j((250, 160, 70)), j((110, 55, 120))).astype(np.uint8))
    else:
        raise FlameError(f"unknown atmosphere {atm!r}")
    return img


def _paste_object(canvas: Image.Image, cat: str, rgb, pattern: str, x: float, y: float, r: float,
                  rng: random.Random) -> None:
    n = canvas.size[0]
    mask = Image.new("L", (n, n), 0)
    details = Image.new("L", (n, n), 0)
    SHAPES[cat](ImageDraw.Draw(mask), ImageDraw.Draw(details), x, y, r)
    outline = Image.fromarray(
        (np.asarray(mask.filter(ImageFilter.MaxFilter(5)), np.int16) - np.asarray(mask, np.int16)).clip(0, 255)
        .astype(np.uint8)
    )
    canvas.paste((25, 25, 30), (0, 0), outline)
    canvas.paste(_pattern(_jitter(rgb, rng), pattern, n, rng), (0, 0), mask)
    canvas.paste((35, 28, 25), (0, 0), details)


def render(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """One image of `scene`; everything random comes from `rng`."""
    n = size * SCALE
    canvas = _background(scene.atmosphere, n, rng)
    _, _, main_at, minor_at = POSITIONS[scene.position]
    u = n / 64  # radii and offsets are defined on a 64-pixel image
    r_main = rng.uniform(*SIZES[scene.size]) * u
    r_minor = rng.uniform(*MINOR_RADIUS) * u
    along = scene.position in ("top", "bottom")  # the free axis of each object
    mx, my = main_at[0] * n, main_at[1] * n
    nx, ny = minor_at[0] * n, minor_at[1] * n
    if along:
        mx += rng.uniform(-7, 7) * u
        nx += rng.uniform(-12, 12) * u
        my += rng.uniform(-1.5, 1.5) * u
    else:
        my += rng.uniform(-7, 7) * u
        ny += rng.uniform(-12, 12) * u
        mx += rng.uniform(-1.5, 1.5) * u
    _paste_object(canvas, scene.minor, COLOURS[scene.minor_colour]["rgb"], "plain", nx, ny, r_minor, rng)
    _paste_object(canvas, scene.main, COLOURS[scene.colour]["rgb"], scene.pattern, mx, my, r_main, rng)
    if scene.atmosphere == "snowy":
        d = ImageDraw.Draw(canvas)
        for _ in range(rng.randint(15, 25)):
            px, py = rng.uniform(0, n), rng.uniform(0, n)
            d.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=(250, 250, 255))
    img = canvas.resize((size, size), Image.LANCZOS)
    if scene.atmosphere == "foggy":
        img = Image.blend(img, Image.new("RGB", img.size, (215, 215, 220)), 0.35)
    arr = np.asarray(img, np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 5, arr.shape)
    return Image.fromarray((arr + noise).round().clip(0, 255).astype(np.uint8), "RGB")
