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
- zeroshot: the main object's category, CLIP_benchmark layout with class names and templates;
- with `ScenesConfig.study` (`flame study`): train samples also carry `KEY.late.txt` (a long caption,
  100+ CLIP tokens, whose minor object, its colour and the relation come after token 77);
  eval/long-late and eval/long-front (groups of 4 scenes sharing the caption's opening, captioned with
  the details late / in front); eval/hard-negatives/pairs.jsonl (each test image's caption against the
  same caption with the objects' colours or the two objects swapped).
Evaluation splits are in CLIP_benchmark's webdataset layout (`test/nshards.txt`, `test/0.tar`
with `KEY.png` + `KEY.txt` or `KEY.cls`, `dataset_type.txt`, `classnames.txt`,
`zeroshot_classification_templates.txt`).

Tar files are byte-for-byte reproducible (fixed member order, mtime 0, no owner names).

Modules: `vocabulary` (the words and `Scene`), `captions` (the caption templates), `drawing`
(`render`), `splits` (`ScenesConfig`, `plan`), `writing` (`write_dataset`).
"""

from __future__ import annotations

from flame.data.scenes.captions import (
    CAPTIONS,
    facet_words,
    french_caption,
    german_caption,
    long_caption,
    paraphrase_caption,
    short_caption,
    spanish_caption,
    words,
)
from flame.data.scenes.drawing import SCALE, SHAPES, render
from flame.data.scenes.longcaps import SWAPS, detail_phrases, front_caption, hard_negative, late_caption, opening
from flame.data.scenes.splits import QUICK, Plan, ScenesConfig, plan
from flame.data.scenes.vocabulary import (
    ATMOSPHERES,
    CATEGORIES,
    COLOURS,
    HELDOUT,
    LANGUAGES,
    MINOR_RADIUS,
    PATTERNS,
    POSITIONS,
    RELATIONS,
    SHARED_WORDS,
    SIZES,
    VERSION,
    ZEROSHOT_TEMPLATES,
    Scene,
)
from flame.data.scenes.writing import (
    NEGATIVES,
    RETRIEVAL_SPLITS,
    STUDY_SPLITS,
    scaled,
    settings_match,
    write_dataset,
)
from flame.errors import FlameError

__all__ = [
    "NEGATIVES", "STUDY_SPLITS", "SWAPS", "detail_phrases", "front_caption", "hard_negative", "late_caption",
    "opening", "ATMOSPHERES", "CAPTIONS", "CATEGORIES", "COLOURS", "HELDOUT", "LANGUAGES", "MINOR_RADIUS", "PATTERNS",
    "POSITIONS", "QUICK", "RELATIONS", "RETRIEVAL_SPLITS", "SCALE", "SHAPES", "SHARED_WORDS", "SIZES", "VERSION",
    "ZEROSHOT_TEMPLATES", "FlameError", "Plan", "Scene", "ScenesConfig", "facet_words", "french_caption",
    "german_caption", "long_caption", "paraphrase_caption", "plan", "render", "scaled", "settings_match",
    "short_caption", "spanish_caption", "words", "write_dataset",
]
