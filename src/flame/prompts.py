"""Facet prompt sets (FLAME.md section 1) and the caption clean-up rules.

A prompt set is a prefix template holding `{cap}` plus K facet prompts. The facet
encoder reads the prefix once and answers every facet in the same forward pass.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from flame.errors import FlameError

# Caption tokens one sequence may hold (FacetEncoder's max_caption_tokens, `flame embed --max-caption-tokens`):
# a recaption runs to ~150-300 tokens; a web page pasted into a caption field must not size the attention mask.
DEFAULT_MAX_CAPTION_TOKENS = 512

_SHORT_PREFIX = 'Image description : "{cap}" . After thinking step by step , '
_LONG_PREFIX = 'Detailed Image description : "{cap}" . After thinking step by step , '
_ONE_WORD = ' means in just one word:"'

FACETS = (
    "this image description" + _ONE_WORD,
    "the category of the main object in this image" + _ONE_WORD,
    "the prominent characteristic or pattern of the main object in this image" + _ONE_WORD,
    "the category of the minor object in this image" + _ONE_WORD,
    "the prominent characteristic or pattern of the minor object in this image" + _ONE_WORD,
    "the primary action or event taking place in this image" + _ONE_WORD,
    "the overall atmosphere or emotion of this image" + _ONE_WORD,
)

@dataclass(frozen=True)
class PromptSet:
    """`prefix` holds `{cap}`; `sep` is text placed before the first facet in "continue" mode
    only (the released FLAME code's literal `<s>`, followed by one space), visible to the first
    facet alone. Special-token text in `sep` (Mistral's `<s>`) is parsed as that token, as the
    release does; in a caption it is never."""

    name: str
    prefix: str
    facets: tuple[str, ...]
    sep: str = ""

    def __post_init__(self) -> None:
        if self.prefix.count("{cap}") != 1:
            raise FlameError(f"prompt set {self.name!r}: the prefix must contain '{{cap}}' exactly once")
        if not self.facets or not all(isinstance(f, str) and f.strip() for f in self.facets):
            raise FlameError(f"prompt set {self.name!r}: needs a non-empty list of non-empty facet prompts")

    @property
    def k(self) -> int:
        return len(self.facets)

    def split_prefix(self) -> tuple[str, str]:
        """Text before and after the caption."""
        before, after = self.prefix.split("{cap}")
        return before, after

    def to_dict(self) -> dict:
        return {"name": self.name, "prefix": self.prefix, "facets": list(self.facets), "sep": self.sep}

PROMPT_SETS: dict[str, PromptSet] = {
    "raw": PromptSet("raw", _SHORT_PREFIX, FACETS[:1]),
    "short": PromptSet("short", _SHORT_PREFIX, FACETS[:3], sep="<s>"),
    "long": PromptSet("long", _LONG_PREFIX, FACETS, sep="<s>"),
}

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_caption(caption: str) -> str:
    """FLAME's clean-up: quotes become apostrophes, a trailing '?' becomes '.', and a
    caption that does not end in . ? " ' gets a final '.'. Surrounding whitespace is
    dropped (the release keeps it), and lone surrogates (valid in JSON, not encodable as
    UTF-8, so no tokenizer takes them) become U+FFFD."""
    cap = _SURROGATE.sub("\ufffd", caption).strip()
    if cap and cap[-1] not in ".?\"'":
        cap += "."
    cap = cap.replace('"', "'")
    if cap.endswith("?"):
        cap = cap[:-1] + "."
    return cap

def load_prompt_set(spec: str | PromptSet) -> PromptSet:
    """A built-in name (raw, short, long), a PromptSet, or a YAML/JSON file with
    `prefix` (holding {cap}), `facets` (list of strings) and optionally `name`, `sep`."""
    if isinstance(spec, PromptSet):
        return spec
    if spec in PROMPT_SETS:
        return PROMPT_SETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise FlameError(
            f"unknown prompt set {spec!r}: use one of {', '.join(PROMPT_SETS)} or a YAML/JSON file"
        )
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise FlameError(f"prompt-set file {path}: cannot parse ({e.__class__.__name__})") from e
    if not isinstance(data, dict) or not isinstance(data.get("prefix"), str) or not isinstance(
        data.get("facets"), list
    ):
        raise FlameError(
            f"prompt-set file {path}: expected a mapping with 'prefix' (a string holding {{cap}}) "
            "and 'facets' (a list of strings)"
        )
    unknown = set(data) - {"name", "prefix", "facets", "sep"}
    if unknown:
        raise FlameError(f"prompt-set file {path}: unknown keys {sorted(unknown)}")
    return PromptSet(
        name=str(data.get("name", path.stem)),
        prefix=data["prefix"],
        facets=tuple(data["facets"]),
        sep=str(data.get("sep", "")),
    )
