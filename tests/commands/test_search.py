"""flame search: index a photo folder incrementally, query it, write an escaped HTML contact sheet."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flame.cli import main as flame_main
from flame.errors import FlameError
from flame.model import FlameModel
from flame.prompts import PROMPT_SETS
from flame.search import default_prompts
from flame.vision import TowerConfig

NASTY = "<script>alert(1)</script> & co.png"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llm_dir) -> Path:
    """A saved model whose text side points at the tiny LLM (as flame train would record it)."""
    from flame.llm import llm_fingerprint, load_llm

    llm, _ = load_llm(str(tiny_llm_dir), device="cpu")
    sets = [{**PROMPT_SETS[n].to_dict(), "source": "txt"} for n in ("raw", "long")]
    text = {"llm": {"spec": str(tiny_llm_dir), "fingerprint": llm_fingerprint(llm)}, "layer": [2],
            "positions": "restart", "prompt_sets": sets, "facets": [], "k": 8, "dim": 32, "normalized": True}
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "ckpt"
    FlameModel(TowerConfig("vit-tiny", embed_dim=32, proj_hidden=32, image_size=32), text).save(folder)
    return folder


def _photo(path: Path, seed: int, size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    _photo(root / "a.jpg", 1)
    _photo(root / "trip" / "b.png", 2, (64, 30))
    _photo(root / "trip" / "deep" / "C.JPEG", 3)
    _photo(root / NASTY, 4)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "notes.txt").write_text("not a photo")
    _photo(root / ".hidden" / "skip.png", 5)
    return root


@pytest.fixture
def counted(monkeypatch):
    """Counts the images that reach the image tower."""
    seen = {"images": 0}
    original = FlameModel.encode_image

    def encode_image(self, images, *a, **kw):
        seen["images"] += len(images)
        return original(self, images, *a, **kw)

    monkeypatch.setattr(FlameModel, "encode_image", encode_image)
    return seen


def _index(photos, model_dir, capsys, *extra):
    code = flame_main(["search", "index", str(photos), "--model", str(model_dir), "--no-progress", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _files(photos) -> dict:
    from flame.search import index_entries

    return index_entries(photos / ".flame-index")


def test_index_then_reindex_encodes_only_new_or_changed(photos, model_dir, counted, capsys):
    code, out, err = _index(photos, model_dir, capsys, "--workers", "1")  # decoding in a worker process
    assert code == 0, err
    assert "5 photos: 4 encoded, 0 unchanged, 1 unreadable (skipped)" in out
    assert "broken.jpg" in err and counted["images"] == 4
    files = _files(photos)
    assert sorted(files) == sorted(["a.jpg", "trip/b.png", "trip/deep/C.JPEG", NASTY])

    # the stored vectors are the model's own (fp16 in the store)
    from flame.search import load_index

    model = FlameModel.from_pretrained(model_dir)
    rels, vecs, root = load_index(photos / ".flame-index", model)
    assert root == photos.resolve()
    with Image.open(photos / "trip" / "b.png") as im:
        direct = model.encode_image([im])[0].numpy()
    assert np.allclose(vecs[rels.index("trip/b.png")], direct, atol=2e-3)

    # a new photo: only it is encoded
    counted["images"] = 0
    _photo(photos / "trip" / "new.webp", 6)
    code, out, _ = _index(photos, model_dir, capsys, "--workers", "0")
    assert code == 0 and counted["images"] == 1
    assert "6 photos: 1 encoded, 4 unchanged, 1 unreadable" in out
    assert _files(photos)["a.jpg"] == files["a.jpg"]  # reused entry, same shard row

    # nothing new: nothing encoded
    counted["images"] = 0
    code, out, _ = _index(photos, model_dir, capsys, "--workers", "0")
    assert code == 0 and counted["images"] == 0 and "0 encoded, 5 unchanged" in out

    # a changed photo (new content, new size/mtime) is re-encoded; a deleted one is forgotten
    _photo(photos / "a.jpg", 7, (40, 60))
    os.utime(photos / "a.jpg", ns=(10**18, 10**18))
    (photos / "trip" / "deep" / "C.JPEG").unlink()
    code, out, _ = _index(photos, model_dir, capsys, "--workers", "0")
    assert code == 0 and counted["images"] == 1
    assert "5 photos: 1 encoded, 3 unchanged, 1 unreadable (skipped), 1 removed" in out
    files = _files(photos)
    assert "trip/deep/C.JPEG" not in files and len(files) == 4
    rels, vecs, _ = load_index(photos / ".flame-index", model)
    with Image.open(photos / "a.jpg") as im:
        assert np.allclose(vecs[rels.index("a.jpg")], model.encode_image([im])[0].numpy(), atol=2e-3)
    # only shards that still hold live rows are kept
    shards = {p.name.split(".")[0] for p in (photos / ".flame-index" / "shards").glob("*.keys.json")}
    assert shards == {e["shard"] for e in files.values()}


def test_query_prints_ranked_matches_and_writes_escaped_html(photos, model_dir, capsys, tmp_path, monkeypatch):
    assert _index(photos, model_dir, capsys, "--workers", "0")[0] == 0
    monkeypatch.setattr("flame.search.query.BLOCK", 2)  # scores are computed in blocks of stored rows
    html_file = tmp_path / "sheet" / "out.html"
    query = "a <b>bold</b> & noisy photo"
    code = flame_main(["search", "query", query, "--model", str(model_dir), "--index", str(photos / ".flame-index"),
                       "-k", "3", "--html", str(html_file), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert code == 0
    assert "(raw prompts)" in out  # a short query uses the raw set
    rows = re.findall(r"^\s+(\d+)\s+(-?\d\.\d{4})\s+(.+)$", out, flags=re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)

    # the same ranking computed by hand from the index and encode_text
    from flame.search import load_index

    model = FlameModel.from_pretrained(model_dir, cache_dir=tmp_path / "cache")
    rels, vecs, _ = load_index(photos / ".flame-index", model)
    s = vecs @ model.encode_text([query], prompts="raw")[0].numpy()
    best = np.argsort(-s)[:3]
    assert [r[2] for r in rows] == [rels[i] for i in best]
    assert np.allclose(scores, s[best], atol=1e-4)

    page = html_file.read_text()
    assert page.count("data:image/jpeg;base64,") == 3
    assert "<script>" not in page and "<b>bold" not in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; noisy photo" in page
    if NASTY in [r[2] for r in rows]:
        assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co.png" in page
    # the nasty file name always appears escaped when it is a hit
    code = flame_main(["search", "query", "another query", "--model", str(model_dir), "--index",
                       str(photos / ".flame-index"), "-k", "4", "--html", str(html_file),
                       "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    page = html_file.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co.png" in page and "<script>" not in page


def test_long_queries_use_the_long_prompt_set(photos, model_dir, capsys, tmp_path):
    assert default_prompts("a red kite") == "raw"
    assert default_prompts("A red kite. Two children run after it on the sand.") == "long"
    assert default_prompts(" ".join(["word"] * 21)) == "long"
    assert default_prompts("\u6d77\u8fb9\u7684\u98ce\u7b5d\u3002\u4e24\u4e2a\u5b69\u5b50\u5728\u8ffd") == "long"
    assert default_prompts("Mt. Fuji") == "long"  # the documented simple rule: a sentence end then more text
    assert _index(photos, model_dir, capsys, "--workers", "0")[0] == 0
    code = flame_main(["search", "query", "A red kite. Two children run after it.", "--model", str(model_dir),
                       "--index", str(photos / ".flame-index"), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert code == 0 and "(long prompts)" in out and len(re.findall(r"^\s+\d+\s", out, flags=re.M)) == 4


def test_bad_input_is_one_line_and_exit_2(photos, model_dir, capsys, tmp_path):
    def err_of(argv):
        code = flame_main(argv)
        err = capsys.readouterr().err.strip()
        return code, err

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "weights.bin").write_bytes(b"x")
    code, err = err_of(["search", "query", "a dog", "--model", str(not_a_model), "--index", str(photos)])
    assert code == 2 and len(err.splitlines()) == 1 and "has no model.safetensors" in err  # weights.bin: a pickle
    code, err = err_of(["search", "index", str(photos), "--model", str(not_a_model)])
    assert code == 2 and len(err.splitlines()) == 1
    with pytest.raises(FlameError, match="has no model.safetensors"):  # --debug keeps the traceback
        flame_main(["search", "query", "a dog", "--model", str(not_a_model), "--debug"])
    code, err = err_of(["search", "query", "a dog", "--model", str(model_dir), "--index", str(tmp_path / "none")])
    assert code == 2 and "no search index" in err and "flame search index" in err
    code, err = err_of(["search", "index", str(tmp_path / "nowhere"), "--model", str(model_dir)])
    assert code == 2 and "not a folder" in err

    # one indexer at a time
    import fcntl

    (photos / ".flame-index").mkdir()
    with open(photos / ".flame-index" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = _index(photos, model_dir, capsys, "--workers", "0")
    assert code == 2 and "being updated by another" in err

    # an index made by another model is refused (its vectors live in another space); --rebuild replaces it
    assert _index(photos, model_dir, capsys, "--workers", "0")[0] == 0
    other = tmp_path / "other"
    m = FlameModel.from_pretrained(model_dir)
    with torch.no_grad():
        m.logit_bias.add_(1.0)
    m.save(other)
    code, _, err = _index(photos, other, capsys, "--workers", "0")
    assert code == 2 and "another model" in err and "--rebuild" in err
    code, err = err_of(["search", "query", "a dog", "--model", str(other), "--index", str(photos / ".flame-index")])
    assert code == 2 and "another model" in err
    code, out, _ = _index(photos, other, capsys, "--workers", "0", "--rebuild")
    assert code == 0 and "4 encoded, 0 unchanged" in out


def test_dead_rows_are_dropped_and_compacted_without_reencoding(photos, model_dir, counted, capsys):
    from flame.search import load_index

    assert _index(photos, model_dir, capsys, "--workers", "0")[0] == 0  # batch-000001: 4 photos
    _photo(photos / "z.bmp", 8)
    assert _index(photos, model_dir, capsys, "--workers", "0")[0] == 0  # batch-000002: z.bmp
    before = dict(zip(*load_index(photos / ".flame-index")[:2]))
    counted["images"] = 0
    for rel in ("a.jpg", "trip/b.png", "trip/deep/C.JPEG"):
        (photos / rel).unlink()
    code, out, _ = _index(photos, model_dir, capsys, "--workers", "0")
    assert code == 0 and counted["images"] == 0 and "0 encoded, 2 unchanged" in out and "3 removed" in out
    files = _files(photos)
    shards = sorted(p.name.split(".")[0] for p in (photos / ".flame-index" / "shards").glob("*.keys.json"))
    assert len(shards) == 1 and {e["shard"] for e in files.values()} == set(shards)  # 2 live of 5 rows: merged
    rels, vecs, _ = load_index(photos / ".flame-index")
    assert rels == sorted([NASTY, "z.bmp"])
    assert all(np.array_equal(before[r], v) for r, v in zip(rels, vecs))


def test_a_killed_index_run_keeps_its_committed_photos(photos, model_dir, monkeypatch, capsys):
    import flame.search as search
    import flame.search.index

    monkeypatch.setattr(flame.search.index, "COMMIT_EVERY", 2)
    original = FlameModel.encode_image
    calls = {"n": 0}

    def dies_on_third_batch(self, images, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C or a kill mid-run leaves behind
        return original(self, images, *a, **kw)

    monkeypatch.setattr(FlameModel, "encode_image", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        search.build_index(photos, FlameModel.from_pretrained(model_dir), batch_size=1, workers=0, progress=False)
    assert len(_files(photos)) == 2  # the first two photos were committed
    monkeypatch.setattr(FlameModel, "encode_image", original)
    code, out, _ = _index(photos, model_dir, capsys, "--workers", "0")
    assert code == 0 and "5 photos: 2 encoded, 2 unchanged, 1 unreadable" in out


@pytest.mark.parametrize("action", ["index", "query"])
def test_help_explains_each_action(action, capsys):
    with pytest.raises(SystemExit) as e:
        flame_main(["search", action, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--model" in out and "--index" in out
    assert ("--prompts" in out and "more than 20" in out) if action == "query" else "new or changed" in out


@pytest.mark.parametrize(
    "action, yaml_text, message",
    [
        ("index", "batch_size: abc\n", "--batch-size (batch_size): expected a whole number, got 'abc'"),
        ("index", "workers: -1\n", "--workers must be >= 0 (got -1)"),
        ("query", "k: many\n", "-k (k): expected a whole number, got 'many'"),
        ("query", "k: 0\n", "-k must be >= 1 (got 0)"),
        ("query", "force-llm: sometimes\n", "--force-llm (force_llm): expected true or false"),
    ],
)
def test_config_file_bad_value_is_one_line_exit_2(action, yaml_text, message, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {tmp_path / 'nowhere'}\n" + yaml_text)
    positional = str(tmp_path) if action == "index" else "a dog"
    capsys.readouterr()
    code = flame_main(["search", action, positional, "--config", str(bad)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_config_file_settings_and_help_defaults(tmp_path, capsys):
    from flame import config
    from flame.search import IndexConfig, QueryConfig

    f = tmp_path / "q.yaml"
    f.write_text("model: run\nk: 3\nhtml: out/sheet.html\n")
    cfg = config.build(QueryConfig, {"text": "a kite", "k": "5"}, f)
    assert (cfg.k, cfg.html, cfg.text, cfg.index) == (5, Path("out/sheet.html"), "a kite", None)
    cfg = config.build(IndexConfig, {"photos": "p", "model": "m"})
    assert (cfg.workers, cfg.batch_size, cfg.progress, cfg.rebuild) == (None, 64, True, False)
    for action, texts in (("index", ["(default 64)", "(default min(4, CPUs))", "(default PHOTOS/.flame-index)",
                                     "--no-progress", "--rebuild"]),
                          ("query", ["-k K", "(default 10)", "(default ./.flame-index)", "(default auto)"])):
        with pytest.raises(SystemExit):
            flame_main(["search", action, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert all(t in out for t in texts), (action, out)
