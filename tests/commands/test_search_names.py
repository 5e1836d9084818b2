"""Photo names that are not UTF-8 (old cameras, Windows zips; issue 18, item 2): `flame search
index` encodes them like any photo, a rerun finds them unchanged (the name is kept exactly),
and a query prints and links them (their bytes shown as \\xNN)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.commands import run_flame
from support.search_data import photo, save_tiny_model

LATIN1 = b"caf\xe9 \xe0 la plage.png"  # a Latin-1 name: not valid UTF-8
SJIS = b"\x82\xa0\x82\xa2.png"  # Shift-JIS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llm_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "ckpt", tiny_llm_dir)


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses names that are not UTF-8")
def test_names_that_are_not_utf8_are_indexed_kept_and_shown(tmp_path, model_dir, capsys):
    from flame.model import FlameModel
    from flame.search import load_index

    root = tmp_path / "photos"
    photo(root / "plain.png", 1)
    bad = [os.fsdecode(root) + "/" + os.fsdecode(LATIN1), os.fsdecode(root) + "/trip/" + os.fsdecode(SJIS)]
    photo(Path(bad[0]), 2)
    photo(Path(bad[1]), 3, (30, 60))
    args = ["--model", model_dir, "--no-progress", "--workers", "0"]
    r = run_flame(capsys, "search", "index", root, *args)
    assert r.code == 0, r.err
    assert "3 photos: 3 encoded, 0 unchanged, 0 unreadable" in r.out
    # the stored vector of the Latin-1 photo is the model's own
    model = FlameModel.from_pretrained(model_dir)
    rels, vecs, _ = load_index(root / ".flame-index", model)
    rel = os.fsdecode(LATIN1)
    assert rel in rels and os.fsencode(rels[rels.index(rel)]) == LATIN1
    with Image.open(bad[0]) as im:
        np.testing.assert_allclose(vecs[rels.index(rel)], model.encode_image([im])[0].numpy(), atol=2e-3)
    # a rerun finds every photo unchanged: the names read back are the names on disk
    r = run_flame(capsys, "search", "index", root, *args)
    assert r.code == 0 and "3 photos: 0 encoded, 3 unchanged" in r.out
    # the query prints them (bytes as \xNN) and the contact sheet shows their thumbnails
    sheet = tmp_path / "sheet.html"
    r = run_flame(capsys, "search", "query", "a photo", "--model", model_dir, "--index", root / ".flame-index",
                  "-k", "3", "--html", sheet, "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r.err
    assert "caf\\xe9 \\xe0 la plage.png" in r.out and "trip/\\x82\\xa0\\x82\\xa2.png" in r.out
    page = sheet.read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == 3 and "caf\\xe9 \\xe0 la plage.png" in page
    # deleting it is seen too
    os.unlink(bad[0])
    r = run_flame(capsys, "search", "index", root, *args)
    assert r.code == 0 and "2 photos: 0 encoded, 2 unchanged, 0 unreadable (skipped), 1 removed" in r.out
