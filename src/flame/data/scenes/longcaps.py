"""Long captions whose distinguishing details come late or early (`flame study`'s long-caption
split), and SugarCrepe-style hard negatives with two attributes swapped.

A long caption is an opening about the main object and the weather (its category, colour,
size, pattern, atmosphere; never the minor object, its colour, the relation or the position,
which the relation gives away) followed by the details: the minor object, its colour and the
relation. The opening is long enough (77+ CLIP tokens) that CLIP's 77-token context cuts every
detail off; `front_caption` is the same text with the details moved to the front, so the
effect of truncation is separated from everything else.
"""

from __future__ import annotations

from flame.data.scenes.vocabulary import PATTERNS, Scene

# the weather without colour words (a colour word in the opening could be the minor object's)
_WEATHER = {
    "sunny": ("on a sunny day; the sky is bright and clear and the sun shines warmly over everything", "cheerful"),
    "night": ("at night; the sky is black, with a few faint lights scattered high up in the darkness", "calm"),
    "rainy": ("on a rainy day; heavy clouds fill the sky and thin streaks of rain are falling", "gloomy"),
    "foggy": ("on a foggy day; a pale, thick fog hides the background and softens every edge", "mysterious"),
    "snowy": ("on a snowy day; snow is falling quietly and the ground is covered in fresh snow", "peaceful"),
    "sunset": ("at sunset; the sky glows in the warm, fading light of a long summer evening", "romantic"),
}


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def opening(s: Scene) -> str:
    """What a long caption says before its details: the main object and the weather only."""
    weather, mood = _WEATHER[s.atmosphere]
    return " ".join([
        f"This picture is a simple drawing of {_a(s.size)} {s.size} {s.colour} {s.main}.",
        f"The {s.main} is the main object of the picture and the largest thing in the frame.",
        f"Its body is {s.colour}, and its surface shows {PATTERNS[s.pattern]}.",
        f"The outline of the {s.colour} {s.main} is dark and sharp, so its shape is easy to recognise at once.",
        f"The scene is set {weather}, which gives the whole image a {mood} mood.",
    ])


def details(s: Scene) -> str:
    """The distinguishing details: the minor object, its colour and the relation."""
    return (f"Apart from the {s.main}, there is one more thing to see: a second, minor object, which is "
            f"{_a(s.minor_colour)} {s.minor_colour} {s.minor}. Its {s.minor_colour} colour is its most visible "
            f"feature. The {s.colour} {s.main} is {s.relation} the {s.minor_colour} {s.minor}.")


def late_caption(s: Scene) -> str:
    """The long caption with every distinguishing detail after the opening."""
    return f"{opening(s)} {details(s)}"


def front_caption(s: Scene) -> str:
    """The same sentences with the details first."""
    return f"{details(s)} {opening(s)}"


def detail_phrases(s: Scene) -> list[str]:
    """The phrases that tell scenes sharing an opening apart (what truncation must not reach)."""
    return [s.minor, s.minor_colour, s.relation]


SWAPS = ("colours", "objects")


def hard_negative(s: Scene, swap: str) -> Scene:
    """The scene with two attributes swapped: the two objects' colours, or main and minor object."""
    from dataclasses import replace

    if swap == "colours":
        return replace(s, colour=s.minor_colour, minor_colour=s.colour)
    if swap == "objects":
        return replace(s, main=s.minor, minor=s.main)
    raise ValueError(f"unknown swap {swap!r}")
