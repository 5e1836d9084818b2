"""The HTML contact sheet of `flame search query --html`: one self-contained page, inline JPEG
thumbnails, every text HTML-escaped (photo names and queries are user data)."""

from __future__ import annotations

import base64
import html
import io
import warnings
from pathlib import Path

from flame.data.images import open_image
from flame.search.query import shown


def _thumbnail(path: Path, size: int = 256) -> str | None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image(path.read_bytes()) as im:
                im = im.convert("RGB")
                im.thumbnail((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError, SyntaxError):
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def contact_sheet(query: str, prompts: str, hits: list[tuple[float, str]], photos: Path, model_name: str) -> str:
    """A self-contained HTML page: inline JPEG thumbnails, every text HTML-escaped."""
    e = html.escape
    cards = []
    for rank, (score, rel) in enumerate(hits, 1):
        thumb = _thumbnail(photos / rel)
        name = shown(rel)
        img = (f'<img src="data:image/jpeg;base64,{thumb}" alt="{e(name)}">' if thumb
               else '<div class="missing">cannot read this photo</div>')
        cards.append(f'<figure>{img}<figcaption><b>#{rank}</b> {score:.4f}<br>{e(name)}</figcaption></figure>')
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>flame search: {e(query)}</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}"
        ".grid{display:flex;flex-wrap:wrap;gap:12px}"
        "figure{margin:0;width:260px}img{max-width:256px;max-height:256px;display:block}"
        "figcaption{font-size:13px;word-break:break-all}.missing{width:256px;height:96px;background:#eee}"
        "</style></head><body>\n"
        f"<h1>flame search</h1><p><b>query:</b> {e(query)}</p>"
        f"<p>prompt set: {e(prompts)} &middot; model: {e(model_name)} &middot; {len(hits)} results</p>\n"
        f"<div class=\"grid\">\n" + "\n".join(cards) + "\n</div></body></html>\n"
    )
