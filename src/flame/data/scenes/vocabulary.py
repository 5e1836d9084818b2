"""The scenes' vocabulary: object categories, colours, patterns, sizes, positions, relations and
atmospheres with their paraphrases and translations, the held-out pairs, and `Scene`."""

from __future__ import annotations

from dataclasses import dataclass

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
