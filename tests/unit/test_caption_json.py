"""A `.json` caption table (the recaption release's format: one big array, or one object keyed
by `__key__`) is streamed (issue 18, item 15): a rank keeps only its rows in memory, never the
whole document, and reads exactly what `json.loads` of the whole file gives."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest

from flame.data.captions import CaptionTable
from flame.errors import FlameError


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["a", "red", "kite", "over", "the", "beach", "two", "children", "running", "windy", "day"]
    return [{"__key__": f"{i:09d}", "short": " ".join(rng.choices(words, k=8)),
             "long": " ".join(rng.choices(words, k=60)), "width": rng.randint(64, 4096)} for i in range(n)]


@pytest.mark.parametrize("form", ["array", "object"])
def test_a_rank_holds_its_rows_not_the_table(tmp_path, form):
    rows = _rows(20_000)
    path = tmp_path / "recap.json"
    doc = rows if form == "array" else {r["__key__"]: {k: v for k, v in r.items() if k != "__key__"} for r in rows}
    path.write_text(json.dumps(doc, indent=1 if form == "object" else None))
    size = path.stat().st_size  # ~7.5 MB
    wanted = {r["__key__"] for r in rows[::400]}  # a rank's share: 50 rows
    table = CaptionTable(path)
    tracemalloc.start()
    try:
        table.load(["short", "long"], keys=wanted)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert table.column("long") == {r["__key__"]: r["long"] for r in rows if r["__key__"] in wanted}
    assert table.column("short") == {r["__key__"]: r["short"] for r in rows if r["__key__"] in wanted}
    assert peak < size / 2, (peak, size)  # json.loads of the whole file holds the text and every row


def test_streamed_reading_equals_json_loads(tmp_path, monkeypatch):
    """Odd documents, read in chunks of 1 to 7 characters (values cut anywhere, numbers too)."""
    import flame.data.jsonstream as js

    docs = [[], {}, [1, 23, -4.5e-3, 1e10, True, None, "s\u00e9\u4e2d\U0001f600", {"a": [1, {"b": "]},"}]}],
            {"k": "v", "n": 12345, "o": {"x": [1.25, 2]}}, [{"c": "\\\"quoted\\\""}] * 3]
    texts = [json.dumps(d, indent=i, ensure_ascii=a) for d in docs for i in (None, 2) for a in (True, False)]
    texts += ["  [ 1 ,2,\n3 ]  ", '{"a" : 1 , "b":[ ] }']
    for chunk in (1, 2, 3, 7):
        monkeypatch.setattr(js, "CHUNK", chunk)
        for text in texts:
            (tmp_path / "t.json").write_text(text, encoding="utf-8")
            want = json.loads(text)
            want = [(None, v) for v in want] if isinstance(want, list) else list(want.items())
            assert list(js.iter_json_items(tmp_path / "t.json")) == want, (chunk, text)
        for bad in ["[1,2", "[1 2]", '{"a" 1}', "[1,]", "[1] x", "", "x", "{1:2}", "[1.5e]", "[tru]", '{"a":1,}']:
            (tmp_path / "t.json").write_text(bad)
            with pytest.raises(ValueError):
                list(js.iter_json_items(tmp_path / "t.json"))


def test_a_broken_table_is_one_clear_error(tmp_path):
    path = tmp_path / "t.json"
    rows = _rows(50)
    path.write_text(json.dumps(rows)[:-40])  # cut off: a partial download
    with pytest.raises(FlameError, match="t.json: invalid JSON"):
        CaptionTable(path).column("long")
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(FlameError, match="expected a list of objects"):
        CaptionTable(path).column("long")
