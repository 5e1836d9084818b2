"""The demo's built-in dataset: small two-object scenes with short and long captions.

Every 64x64 image shows a *main* object (category, colour, pattern, size, position) and a
smaller *minor* object (category, colour), in a relation (above / below / next to), on a
background whose light or weather sets an atmosphere (sunny, night, rainy, foggy, snowy,
sunset). Captions are written from templates, so a caption is a function of the scene's
*combination*, not of the image: many images share a caption, and the LLM pass embeds each
distinct caption once (that is what keeps `flame demo` within minutes on a laptop CPU).

Splits (all deterministic from one seed):
- train: images of `combos` training combinations, in the img2dataset layout that `flame
  embed` / `flame train` read (`KEY.jpg`, `KEY.txt` short caption, `KEY.long.txt` long
  caption of 40+ words covering the FLAME facets, `KEY.json` the scene);
- test: new images of training combinations, one per distinct short caption;
- compositional: main objects whose (category, colour) pair never occurs in training;
- paraphrase: the test images, captioned only with words no training caption uses
  (synonyms for colours, categories, relations, atmospheres; only the articles a/an are shared);
- multilingual-fr/de/es: the test captions written in French, German and Spanish;
- zeroshot: the main object's category, CLIP_benchmark layout with class names and templates.
Evaluation splits are in CLIP_benchmark's webdataset layout (`test/nshards.txt`, `test/0.tar`
with `KEY.png` + `KEY.txt` or `KEY.cls`, `dataset_type.txt`, `classnames.txt`,
`zeroshot_classification_templates.txt`).

Tar files are byte-for-byte reproducible (fixed member order, mtime 0, no owner names).
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from flame.errors import FlameError
from flame.fileio import write_atomic

VERSION = 3  # bump when images or captions change: cached demo data is regenerated

# ---- vocabulary ---------------------------------------------------------------------------
# category -> paraphrase word, (French noun, gender), (German noun, gender, dative), (Spanish noun, gender)
CATEGORIES: dict[str, dict] = {
    "star": {"para": "asterisk", "fr": ("étoile", "f"), "de": ("Stern", "m", "Stern"), "es": ("estrella", "f")},
    "heart": {"para": "valentine", "fr": ("cœur", "m"), "de": ("Herz", "n", "Herzen"), "es": ("corazón", "m")},
    "house": {"para": "cottage", "fr": ("maison", "f"), "de": ("Haus", "n", "Haus"), "es": ("casa", "f")},
    "tree": {"para": "oak", "fr": ("arbre", "m"), "de": ("Baum", "m", "Baum"), "es": ("árbol", "m")},
    "car": {"para": "automobile", "fr": ("voiture", "f"), "de": ("Auto", "n", "Auto"), "es": ("coche", "m")},
    "boat": {"para": "ship", "fr": ("bateau", "m"), "de": ("Boot", "n", "Boot"), "es": ("barco", "m")},
    "cup": {"para": "mug", "fr": ("tasse", "f"), "de": ("Tasse", "f", "Tasse"), "es": ("taza", "f")},
    "flower": {"para": "blossom", "fr": ("fleur", "f"), "de": ("Blume", "f", "Blume"), "es": ("flor", "f")},
    "moon": {"para": "crescent", "fr": ("lune", "f"), "de": ("Mond", "m", "Mond"), "es": ("luna", "f")},
    "fish": {"para": "trout", "fr": ("poisson", "m"), "de": ("Fisch", "m", "Fisch"), "es": ("pez", "m")},
}
# colour -> RGB, paraphrase, French (m, f), German adjective stem, Spanish (m, f)
COLOURS: dict[str, dict] = {
    "red": {"rgb": (215, 35, 35), "para": "crimson", "fr": ("rouge", "rouge"), "de": "rot", "es": ("rojo", "roja")},
    "blue": {"rgb": (35, 75, 215), "para": "azure", "fr": ("bleu", "bleue"), "de": "blau", "es": ("azul", "azul")},
    "green": {"rgb": (35, 160, 55), "para": "emerald", "fr": ("vert", "verte"), "de": "grün",
              "es": ("verde", "verde")},
    "yellow": {"rgb": (240, 210, 30), "para": "golden", "fr": ("jaune", "jaune"), "de": "gelb",
               "es": ("amarillo", "amarilla")},
    "purple": {"rgb": (135, 45, 180), "para": "violet", "fr": ("violet", "violette"), "de": "violett",
               "es": ("morado", "morada")},
    "orange": {"rgb": (245, 135, 25), "para": "tangerine", "fr": ("orange", "orange"), "de": "orangefarben",
               "es": ("naranja", "naranja")},
}
PATTERNS: dict[str, str] = {  # pattern -> phrase in the long caption
    "plain": "no pattern at all, just one solid colour",
    "striped": "a striped pattern of light diagonal bands",
    "dotted": "a dotted pattern of light spots",
    "checkered": "a checkered pattern of light squares",
}
# Main object radius range (px at 64). Large objects are what a 3-block ViT with 8-px patches can learn the
# shapes of in minutes: at radius 10-15 a supervised probe reached 0.35 accuracy in 400 steps, at 13.5-19.5 0.53.
SIZES = {"large": (17.0, 19.5), "medium-sized": (13.5, 15.5)}
MINOR_RADIUS = (6.0, 7.0)
# position of the main object -> (relation word, where in the frame, main centre, minor centre) in [0, 1]
POSITIONS: dict[str, tuple[str, str, tuple[float, float], tuple[float, float]]] = {
    "top": ("above", "near the top of the frame", (0.5, 0.32), (0.5, 0.79)),
    "bottom": ("below", "near the bottom of the frame", (0.5, 0.68), (0.5, 0.21)),
    "left": ("next to", "on the left side of the frame", (0.32, 0.5), (0.79, 0.5)),
    "right": ("next to", "on the right side of the frame", (0.68, 0.5), (0.21, 0.5)),
}
RELATIONS: dict[str, dict] = {  # relation -> paraphrase, French, German, Spanish
    "above": {"para": "over", "fr": "au-dessus", "de": "über", "es": "encima de"},
    "below": {"para": "beneath", "fr": "en dessous", "de": "unter", "es": "debajo de"},
    "next to": {"para": "beside", "fr": "à côté", "de": "neben", "es": "al lado de"},
}
# atmosphere -> short phrase, long description, mood, paraphrase, French, German, Spanish
ATMOSPHERES: dict[str, dict] = {
    "sunny": {"short": "on a sunny day", "long": "on a sunny day; the sky is bright blue and the sun shines",
              "mood": "cheerful", "para": "amid cloudless sunshine", "fr": "par une journée ensoleillée",
              "de": "an einem sonnigen Tag", "es": "en un día soleado"},
    "night": {"short": "at night", "long": "at night; the sky is black with a few faint lights",
              "mood": "calm", "para": "around midnight", "fr": "pendant la nuit", "de": "in der Nacht",
              "es": "de noche"},
    "rainy": {"short": "on a rainy day", "long": "on a rainy day; grey clouds fill the sky and rain is falling",
              "mood": "gloomy", "para": "during a downpour", "fr": "par un jour de pluie",
              "de": "an einem regnerischen Tag", "es": "en un día lluvioso"},
    "foggy": {"short": "on a foggy day", "long": "on a foggy day; a pale grey fog hides the background",
              "mood": "mysterious", "para": "amid thick mist", "fr": "par un jour de brouillard",
              "de": "an einem nebligen Tag", "es": "en un día de niebla"},
    "snowy": {"short": "on a snowy day", "long": "on a snowy day; snow is falling and the ground is white",
              "mood": "peaceful", "para": "amid wintry flurries", "fr": "par un jour de neige",
              "de": "an einem verschneiten Tag", "es": "en un día nevado"},
    "sunset": {"short": "at sunset", "long": "at sunset; the sky glows in the warm light of evening",
               "mood": "romantic", "para": "around dusk", "fr": "au coucher du soleil",
               "de": "bei Sonnenuntergang", "es": "al atardecer"},
}
LANGUAGES = ("fr", "de", "es")
# (category, colour) pairs that never occur in training, for either object: the compositional split
HELDOUT: frozenset[tuple[str, str]] = frozenset(
    (cat, list(COLOURS)[(3 * i + 1) % len(COLOURS)]) for i, cat in enumerate(CATEGORIES)
)
ZEROSHOT_TEMPLATES = (
    "a picture of a {c}.",
    "a drawing of a {c}.",
    "an illustration of a {c}.",
    "a simple picture showing a {c}.",
    "a small scene with a {c}.",
    "a cartoon of a {c}.",
)
SHARED_WORDS = frozenset({"a", "an"})  # the only words a paraphrase caption shares with training captions


@dataclass(frozen=True)
class Scene:
    """One captioned combination. Images of the same scene differ in jitter, exact size and
    position, noise and background details, never in what their captions say."""

    main: str  # category
    colour: str
    pattern: str
    size: str
    position: str
    minor: str
    minor_colour: str
    atmosphere: str

    @property
    def relation(self) -> str:
        return POSITIONS[self.position][0]


# ---- captions -----------------------------------------------------------------------------
def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def short_caption(s: Scene) -> str:
    cap = (f"{_a(s.colour)} {s.colour} {s.main} {s.relation} a small {s.minor_colour} {s.minor} "
           f"{ATMOSPHERES[s.atmosphere]['short']}.")
    return cap[0].upper() + cap[1:]


def long_caption(s: Scene) -> str:
    where = POSITIONS[s.position][1]
    atm = ATMOSPHERES[s.atmosphere]
    text = (
        f"{_a(s.size)} {s.size} {s.colour} {s.main} with {PATTERNS[s.pattern]} is the main object of this "
        f"picture, placed {where}. The second, minor object is a small {s.minor_colour} {s.minor}, and its "
        f"{s.minor_colour} colour is its most visible feature. The {s.colour} {s.main} is {s.relation} the "
        f"{s.minor_colour} {s.minor}. The scene is set {atm['long']}, which gives the whole image a "
        f"{atm['mood']} mood."
    )
    return text[0].upper() + text[1:]


def paraphrase_caption(s: Scene) -> str:
    col, minor_col = COLOURS[s.colour]["para"], COLOURS[s.minor_colour]["para"]
    cap = (f"{_a(col)} {col} {CATEGORIES[s.main]['para']} {RELATIONS[s.relation]['para']} "
           f"{_a('little')} little {minor_col} {CATEGORIES[s.minor]['para']} {ATMOSPHERES[s.atmosphere]['para']}.")
    return cap[0].upper() + cap[1:]


def french_caption(s: Scene) -> str:
    noun, g = CATEGORIES[s.main]["fr"]
    noun2, g2 = CATEGORIES[s.minor]["fr"]
    col = COLOURS[s.colour]["fr"][g == "f"]
    col2 = COLOURS[s.minor_colour]["fr"][g2 == "f"]
    art = "Une" if g == "f" else "Un"
    small = "d'une petite" if g2 == "f" else "d'un petit"
    return f"{art} {noun} {col} {RELATIONS[s.relation]['fr']} {small} {noun2} {col2} {ATMOSPHERES[s.atmosphere]['fr']}."


_DE_NOM = {"m": ("Ein", "er"), "f": ("Eine", "e"), "n": ("Ein", "es")}  # article, adjective ending (mixed)


def german_caption(s: Scene) -> str:
    noun, g, _ = CATEGORIES[s.main]["de"]
    _, g2, noun2_dat = CATEGORIES[s.minor]["de"]
    art, ending = _DE_NOM[g]
    art2 = "einer" if g2 == "f" else "einem"  # dative after über/unter/neben (location)
    return (f"{art} {COLOURS[s.colour]['de']}{ending} {noun} {RELATIONS[s.relation]['de']} {art2} kleinen "
            f"{COLOURS[s.minor_colour]['de']}en {noun2_dat} {ATMOSPHERES[s.atmosphere]['de']}.")


def spanish_caption(s: Scene) -> str:
    noun, g = CATEGORIES[s.main]["es"]
    noun2, g2 = CATEGORIES[s.minor]["es"]
    col = COLOURS[s.colour]["es"][g == "f"]
    col2 = COLOURS[s.minor_colour]["es"][g2 == "f"]
    art = "Una" if g == "f" else "Un"
    small = "una pequeña" if g2 == "f" else "un pequeño"
    return f"{art} {noun} {col} {RELATIONS[s.relation]['es']} {small} {noun2} {col2} {ATMOSPHERES[s.atmosphere]['es']}."


CAPTIONS: dict[str, Callable[[Scene], str]] = {
    "short": short_caption,
    "long": long_caption,
    "paraphrase": paraphrase_caption,
    "fr": french_caption,
    "de": german_caption,
    "es": spanish_caption,
}


def words(text: str) -> set[str]:
    """Lower-case words of a caption (letters only; hyphens and apostrophes split words)."""
    out, cur = set(), []
    for ch in text.lower() + " ":
        if ch.isalpha():
            cur.append(ch)
        elif cur:
            out.add("".join(cur))
            cur = []
    return out


def facet_words(s: Scene) -> dict[str, list[str]]:
    """The words a long caption must contain for each FLAME facet (FLAME.md section 1)."""
    return {
        "main object": [s.main],
        "main characteristic": [s.colour, s.size.split("-")[0]] + ([s.pattern] if s.pattern != "plain" else ["solid"]),
        "minor object": [s.minor],
        "minor characteristic": [s.minor_colour, "small"],
        "relation": s.relation.split(),
        "atmosphere": [s.atmosphere if s.atmosphere != "sunset" else "sunset", ATMOSPHERES[s.atmosphere]["mood"]],
    }


# ---- drawing ------------------------------------------------------------------------------
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


# ---- combinations and splits --------------------------------------------------------------
@dataclass
class ScenesConfig:
    """How big the generated set is. `combos` captioned combinations in training; each
    evaluation split has `eval_size` images with distinct captions."""

    seed: int = 0
    train: int = 3000
    combos: int = 300
    eval_size: int = 100
    zeroshot: int = 200
    image_size: int = 64

    def to_dict(self) -> dict:
        return {**asdict(self), "version": VERSION}


QUICK = ScenesConfig(train=640, combos=64, eval_size=48, zeroshot=60)


def _allowed(cat: str, colour: str) -> bool:
    return (cat, colour) not in HELDOUT


def _random_scene(rng: random.Random, main: str | None = None, heldout_main: bool = False) -> Scene:
    cats, cols = list(CATEGORIES), list(COLOURS)
    main = main or rng.choice(cats)
    if heldout_main:
        colour = next(c for k, c in sorted(HELDOUT) if k == main)
    else:
        colour = rng.choice([c for c in cols if _allowed(main, c)])
    minor = rng.choice([c for c in cats if c != main])
    minor_colour = rng.choice([c for c in cols if _allowed(minor, c) and c != colour])
    return Scene(main, colour, rng.choice(list(PATTERNS)), rng.choice(list(SIZES)), rng.choice(list(POSITIONS)),
                 minor, minor_colour, rng.choice(list(ATMOSPHERES)))


def _pairs(rng: random.Random, n: int) -> list[Scene]:
    """n combinations with distinct short captions, made in pairs: a random scene, then the same
    scene with another main category (same colour, pattern, size, position, minor object, weather)."""
    cats, out, seen, tries = list(CATEGORIES), [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise FlameError(f"cannot draw {n} combinations with distinct captions")
        base = _random_scene(rng, main=cats[len(out) // 2 % len(cats)])
        other = [c for c in cats if c not in (base.main, base.minor) and _allowed(c, base.colour)]
        pair = [base, replace(base, main=rng.choice(other))]
        caps = {short_caption(x) for x in pair}
        if not caps & seen:
            seen |= caps
            out.extend(pair)
    return out[:n]


def _distinct(rng: random.Random, n: int, make: Callable[[int], Scene], avoid: Iterable[str] = ()) -> list[Scene]:
    """n scenes with pairwise different short captions (and none in `avoid`)."""
    seen, out = set(avoid), []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise FlameError(f"cannot draw {n} scenes with distinct captions; lower the split size")
        s = make(len(out))
        cap = short_caption(s)
        if cap not in seen:
            seen.add(cap)
            out.append(s)
    return out


@dataclass
class Plan:
    train: list[Scene]  # one entry per training image
    combos: list[Scene]
    test: list[Scene]
    compositional: list[Scene]
    zeroshot: list[Scene]


def plan(config: ScenesConfig) -> Plan:
    """Which scene every image of every split shows (no pixels yet)."""
    if config.eval_size > config.combos:
        raise FlameError(f"eval_size {config.eval_size} needs at least as many training combos ({config.combos})")
    rng = random.Random(f"scenes/{config.seed}/combos")
    cats = list(CATEGORIES)
    combos = _pairs(rng, config.combos)
    # Training order: the two combinations of a pair (same scene, another main category) sit side
    # by side, so most batches hold pairs that only the objects' shapes tell apart; without them
    # colour and weather alone separate a batch's captions and the tower never learns the shapes.
    order = random.Random(f"scenes/{config.seed}/order")
    pairs = [combos[i : i + 2] for i in range(0, len(combos), 2)]
    train: list[Scene] = []
    while len(train) < config.train:
        order.shuffle(pairs)
        train.extend(s for pair in pairs for s in pair)
    train = train[: config.train]
    pick = random.Random(f"scenes/{config.seed}/test")
    test = pick.sample(combos, config.eval_size)
    comp_rng = random.Random(f"scenes/{config.seed}/compositional")
    compositional = _distinct(comp_rng, config.eval_size,
                              lambda i: _random_scene(comp_rng, main=cats[i % len(cats)], heldout_main=True))
    zs_rng = random.Random(f"scenes/{config.seed}/zeroshot")
    zeroshot = [_random_scene(zs_rng, main=cats[i % len(cats)]) for i in range(config.zeroshot)]
    return Plan(train, combos, test, compositional, zeroshot)


# ---- writing ------------------------------------------------------------------------------
def _tar_bytes(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """A reproducible tar: members in the given order, fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=92)
    else:
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _meta(s: Scene, **extra) -> bytes:
    return json.dumps({**{f.name: getattr(s, f.name) for f in fields(s)}, "relation": s.relation, **extra},
                      sort_keys=True).encode()


def _images(scenes: list[Scene], seed: int, split: str, size: int) -> list[Image.Image]:
    return [render(s, random.Random(f"scenes/{seed}/{split}/{i}"), size) for i, s in enumerate(scenes)]


def _write_eval(root: Path, keys: list[str], pngs: list[bytes], labels: list[bytes], label_ext: str,
                files: dict[str, str]) -> None:
    (root / "test").mkdir(parents=True, exist_ok=True)
    write_atomic(root / "test" / "0.tar",
                 _tar_bytes((k, {"png": p, label_ext: t}) for k, p, t in zip(keys, pngs, labels)))
    write_atomic(root / "test" / "nshards.txt", "1\n")
    for name, text in files.items():
        write_atomic(root / name, text)


RETRIEVAL_SPLITS = ("test", "compositional", "paraphrase") + tuple(f"multilingual-{lang}" for lang in LANGUAGES)


def settings_match(out: str | Path, config: ScenesConfig) -> bool:
    path = Path(out) / "settings.json"
    try:
        return json.loads(path.read_text()) == config.to_dict()
    except (OSError, ValueError):
        return False


def write_dataset(out: str | Path, config: ScenesConfig = ScenesConfig(),
                  progress: Callable[[int], None] | None = None) -> bool:
    """Write every split under `out`; returns False (writing nothing) when `out` already
    holds a complete set made with the same settings. `settings.json` is written last, so a
    set interrupted half-way is regenerated. `progress(n)` is told of every n images done."""
    out = Path(out)
    if settings_match(out, config):
        return False
    if out.exists():
        if any(out.iterdir()) and not (out / "settings.json").exists() and not (out / ".scenes").exists():
            raise FlameError(f"{out} exists and is not a generated scenes folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ".scenes").write_text("generated by flame.data.scenes\n")
    p = plan(config)
    tick = progress or (lambda n: None)
    seed, size = config.seed, config.image_size

    train_samples = []
    for i, s in enumerate(p.train):
        img = render(s, random.Random(f"scenes/{seed}/train/{i}"), size)
        train_samples.append((f"tr{i:07d}", {"jpg": _image_bytes(img, "jpg"), "txt": short_caption(s).encode(),
                                             "long.txt": long_caption(s).encode(), "json": _meta(s)}))
        if i % 100 == 99:
            tick(100)
    tick(len(p.train) % 100)
    (out / "train").mkdir()
    write_atomic(out / "train" / "scenes-00000.tar", _tar_bytes(train_samples))

    retrieval = {"dataset_type.txt": "retrieval\n"}
    test_png = [_image_bytes(im, "png") for im in _images(p.test, seed, "test", size)]
    tick(len(p.test))
    test_keys = [f"te{i:07d}" for i in range(len(p.test))]
    for split, style in [("test", "short"), ("paraphrase", "paraphrase")] + [
        (f"multilingual-{lang}", lang) for lang in LANGUAGES
    ]:
        caps = [CAPTIONS[style](s).encode() for s in p.test]
        _write_eval(out / "eval" / split, test_keys, test_png, caps, "txt", retrieval)
    comp_png = [_image_bytes(im, "png") for im in _images(p.compositional, seed, "compositional", size)]
    tick(len(p.compositional))
    _write_eval(out / "eval" / "compositional", [f"co{i:07d}" for i in range(len(comp_png))], comp_png,
                [short_caption(s).encode() for s in p.compositional], "txt", retrieval)
    zs_png = [_image_bytes(im, "png") for im in _images(p.zeroshot, seed, "zeroshot", size)]
    tick(len(p.zeroshot))
    classes = list(CATEGORIES)
    _write_eval(out / "eval" / "zeroshot", [f"zs{i:07d}" for i in range(len(zs_png))], zs_png,
                [str(classes.index(s.main)).encode() for s in p.zeroshot], "cls",
                {"classnames.txt": "\n".join(classes) + "\n",
                 "zeroshot_classification_templates.txt": "\n".join(ZEROSHOT_TEMPLATES) + "\n"})
    write_atomic(out / "scenes.json", json.dumps(
        {"combos": [asdict(s) for s in p.combos], "test": [asdict(s) for s in p.test],
         "compositional": [asdict(s) for s in p.compositional], "heldout": sorted(HELDOUT)}, indent=1) + "\n")
    write_atomic(out / "settings.json", json.dumps(config.to_dict(), indent=2) + "\n")
    return True


def scaled(config: ScenesConfig, **changes) -> ScenesConfig:
    return replace(config, **changes)
