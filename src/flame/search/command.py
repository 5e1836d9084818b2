"""`flame search index|query`: one settings dataclass per action, and what each action prints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from flame.config import at_least, setting
from flame.errors import FlameError
from flame.fileio import write_atomic
from flame.search.index import INDEX_NAME, build_index
from flame.search.query import LONG_CHARS, LONG_WORDS, search, shown
from flame.search.sheet import contact_sheet

EPILOG = """\
examples:
  flame search index ~/Photos --model runs/cc3m-b16
  flame search query 'two children fly a red kite on a windy beach' --model runs/cc3m-b16 \\
      --index ~/Photos/.flame-index -k 20 --html kite.html
"""
INDEX_HELP = "encode every photo under a folder (a rerun adds only new or changed ones)"
QUERY_HELP = "find the photos that best match a text"


@dataclass
class _ModelSettings:
    """What both actions load: the trained model, and where its image tower runs."""

    model: str = setting("", metavar="M", required=True,
                         help="run folder (its latest checkpoint) or checkpoint folder")
    device: str = setting("auto", help="where the image tower runs: auto (cuda if present, else cpu), cpu, cuda")


@dataclass
class IndexConfig(_ModelSettings):
    """`flame search index` settings."""

    DESCRIPTION: ClassVar[str] = (
        "Encode every photo (jpg, jpeg, png, webp, bmp) under PHOTOS, recursively. "
        "A rerun encodes only new or changed photos (size or modification time)."
    )

    photos: str = setting("", positional=True, metavar="PHOTOS", required=True, help="folder of photos")
    index: Path | None = setting(None, metavar="DIR", shown="PHOTOS/.flame-index", help="index folder")
    batch_size: int = setting(64, check=at_least(1), help="images per forward pass")
    workers: int | None = setting(None, check=at_least(0), shown="min(4, CPUs)",
                                  help="DataLoader workers decoding photos")
    rebuild: bool = setting(False, help="replace an index built with another model (only a flame search index is "
                                        "ever replaced)")
    allow_empty: bool = setting(False, help="accept a photo folder with no photos against an index that has some "
                                            "(forgets them all; refused otherwise: an unmounted disk looks empty)")
    progress: bool = setting(True, negate="--no-progress", help="no progress bar")


@dataclass
class QueryConfig(_ModelSettings):
    """`flame search query` settings."""

    DESCRIPTION: ClassVar[str] = "Print the top matches for a text, best first, with cosine scores."

    text: str = setting("", positional=True, metavar="TEXT", required=True,
                        help="the query: a phrase, a long description, any language the LLM reads")
    index: Path | None = setting(None, metavar="DIR", shown="./.flame-index", help="index folder")
    k: int = setting(10, flag="-k", check=at_least(1), help="number of results")
    prompts: str | None = setting(None, metavar="raw|short|long|FILE", help="prompt set for the query",
                                  shown=f"long for more than one sentence, more than {LONG_WORDS} words or more "
                                        f"than {LONG_CHARS} characters, else raw")
    html: Path | None = setting(None, metavar="FILE", help="also write a self-contained HTML contact sheet")
    llm: str | None = setting(None, help="override the LLM spec recorded in the model (e.g. a local copy)")
    llm_device: str | None = setting(None, shown="cuda if present",
                                     help="where the LLM runs if a text must be encoded")
    force_llm: bool = setting(False, help="accept an LLM whose weight fingerprint differs")
    cache_dir: Path | None = setting(None, shown="$FLAME_CACHE/text", help="text-vector cache")


def index_main(cfg: IndexConfig) -> int:
    from flame.distributed import resolve_device
    from flame.model import FlameModel

    photos = Path(cfg.photos)
    if not photos.is_dir():  # before the model is loaded
        raise FlameError(f"{photos} is not a folder of photos")
    model = FlameModel.from_pretrained(cfg.model, device=resolve_device(cfg.device))
    index = cfg.index or photos / INDEX_NAME
    workers = cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)
    r = build_index(photos, model, index, cfg.batch_size, workers, cfg.rebuild, progress=cfg.progress,
                    allow_empty=cfg.allow_empty)
    print(f"{r.photos} photos: {r.encoded} encoded, {r.reused} unchanged, {len(r.unreadable)} unreadable "
          f"(skipped), {r.removed} removed; index {index} (tower in {model.precision})")
    return 0


def query_main(cfg: QueryConfig) -> int:
    from flame.distributed import resolve_device
    from flame.model import FlameModel

    model = FlameModel.from_pretrained(
        cfg.model, device=resolve_device(cfg.device), llm=cfg.llm, llm_device=cfg.llm_device,
        force_llm=cfg.force_llm, cache_dir=cfg.cache_dir,
    )
    index = cfg.index or Path(INDEX_NAME)
    prompts, hits, n, photos = search(model, index, cfg.text, cfg.k, cfg.prompts)
    print(f"{n} photos under {photos or index.parent}; query ({prompts} prompts): {cfg.text}")
    for rank, (score, rel) in enumerate(hits, 1):
        print(f"{rank:>4}  {score:7.4f}  {shown(rel)}")
    if cfg.html:
        cfg.html.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cfg.html, contact_sheet(cfg.text, prompts, hits, photos or index.parent, str(cfg.model)))
        print(f"wrote {cfg.html}")
    return 0


ACTIONS = {
    "index": (IndexConfig, index_main, INDEX_HELP),
    "query": (QueryConfig, query_main, QUERY_HELP),
}
