"""Captions of a scene, written from templates: short, long (every FLAME facet), paraphrase
(no training word), French, German, Spanish."""

from __future__ import annotations

from collections.abc import Callable

from flame.data.scenes.vocabulary import ATMOSPHERES, CATEGORIES, COLOURS, PATTERNS, POSITIONS, RELATIONS, Scene


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
