"""Issue 18 items 2 (captions), 7 and 13: the text cache. A caption with a lone surrogate is cached
(and served on a rerun without the LLM); vectors are keyed by the weights that made them (a forced
or replaced LLM never shares entries with the recorded one); a chunk is checked when read and a
damaged one recomputed; a file planted in the cache shadows nothing; a process holds a bounded
number of open files and looks up only the captions it is given."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.commands import run_flame
from support.untrusted import caption_table, model_folder, text_side

import flame.llm
from flame.model import FlameModel
from flame.prompts import PROMPT_SETS
from flame.textenc import TextEncoder, _Space

SURROGATE = "a photo of a dog \ud83d"  # half an emoji, as scraped JSONL has it


def reference(llm_dir: Path, texts: list[str]) -> torch.Tensor:
    """The raw-set vectors computed directly with the facet encoder (no cache)."""
    from flame.facets import FacetEncoder

    model, tok = flame.llm.load_llm(str(llm_dir), device="cpu")
    facets = FacetEncoder(model, tok, prompts=PROMPT_SETS["raw"], layer=[2]).encode(texts)
    return F.normalize(facets.float().mean(dim=1), dim=-1)


@pytest.fixture()
def llm_a(tiny_llm_dir, tmp_path) -> Path:
    """A private copy of the tiny LLM at a path the test may replace."""
    return Path(shutil.copytree(tiny_llm_dir, tmp_path / "llm"))


def _replace_with_other_weights(path: Path) -> None:
    from conftest import build_tiny_llm

    shutil.rmtree(path)
    build_tiny_llm(path, seed=1)


def _orphans(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*.npy") if not p.with_name(p.name[:-4] + ".keys.json").is_file()]


def test_surrogate_caption_through_encode_text(llm_a, tmp_path, monkeypatch):
    folder = model_folder(tmp_path / "m", text_side(llm_a, None))
    texts = [SURROGATE, "a red car"]
    model = FlameModel.from_pretrained(folder, cache_dir=tmp_path / "cache")
    got = model.encode_text(texts)
    assert torch.allclose(got, reference(llm_a, texts), atol=2e-3)
    assert _orphans(tmp_path / "cache") == []
    monkeypatch.setattr(flame.llm, "load_llm", lambda *a, **k: pytest.fail("the LLM work was repeated"))
    again = FlameModel.from_pretrained(folder, cache_dir=tmp_path / "cache").encode_text(texts[::-1])
    assert torch.equal(again, got.flip(0))


def test_surrogate_caption_through_flame_eval(llm_a, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLAME_CACHE", str(tmp_path / "cache"))
    folder = model_folder(tmp_path / "m", text_side(llm_a, None))
    table = caption_table(tmp_path / "t", [SURROGATE, "a red car", "\udc00 lone low half", "a blue kite"])
    args = ["eval", "--model", folder, "--dataset", table, "--task", "retrieval", "--workers", "0", "--no-progress"]
    r = run_flame(capsys, *args, "--output", tmp_path / "a.json")
    assert r.code == 0, r.err
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["captions"] == 4 and set(first["metrics"]) >= {"image_retrieval_recall@1"}
    assert _orphans(tmp_path / "cache") == []
    monkeypatch.setattr(flame.llm, "load_llm", lambda *a, **k: pytest.fail("the LLM work was repeated"))
    r = run_flame(capsys, *args, "--output", tmp_path / "b.json")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "b.json").read_text())["metrics"] == first["metrics"]


def test_forced_llm_without_llm_never_stores_under_the_recorded_identity(llm_a, tmp_path):
    """--force-llm alone: the recorded spec now holds other weights; their vectors must not be
    served later as the recorded LLM's."""
    model, _ = flame.llm.load_llm(str(llm_a), device="cpu")
    text = text_side(llm_a, flame.llm.llm_fingerprint(model))
    _replace_with_other_weights(llm_a)
    other = reference(llm_a, ["a cat"])
    forced = TextEncoder(text, cache_dir=tmp_path / "cache", force=True).encode(["a cat"])
    assert torch.allclose(forced, other, atol=2e-3)
    from conftest import build_tiny_llm

    shutil.rmtree(llm_a)
    build_tiny_llm(llm_a, seed=0)  # the recorded weights back at the recorded path (as the fixture built them)
    plain = TextEncoder(text, cache_dir=tmp_path / "cache")
    got = plain.encode(["a cat"])
    assert plain.loads == 1  # not served from the forced run's entries
    assert torch.allclose(got, reference(llm_a, ["a cat"]), atol=2e-3)
    assert not torch.allclose(got, other, atol=1e-2)


def test_replaced_weights_at_the_same_path_are_not_served_stale_vectors(llm_a, tmp_path):
    """No fingerprint recorded (a converted release model): the cache is keyed by the weights on disk."""
    text = text_side(llm_a, None)
    before = TextEncoder(text, cache_dir=tmp_path / "cache").encode(["a cat", "a dog"])
    _replace_with_other_weights(llm_a)
    enc = TextEncoder(text, cache_dir=tmp_path / "cache")
    after = enc.encode(["a cat", "a dog"])
    assert enc.loads == 1
    assert torch.allclose(after, reference(llm_a, ["a cat", "a dog"]), atol=2e-3)
    assert not torch.allclose(after, before, atol=1e-2)
    again = TextEncoder(text, cache_dir=tmp_path / "cache")
    assert torch.equal(again.encode(["a cat", "a dog"]), after) and again.loads == 0  # still cached


def _only_chunk(cache: Path) -> Path:
    (npy,) = cache.rglob("*.npy")
    return npy


@pytest.mark.parametrize("damage", ["nan", "float32", "narrow", "flipped"])
def test_a_damaged_cached_vector_is_recomputed(llm_a, tmp_path, damage, caplog):
    text = text_side(llm_a, None)
    texts = ["a cat", "a dog", "a red car"]
    good = TextEncoder(text, cache_dir=tmp_path / "cache").encode(texts)
    npy = _only_chunk(tmp_path / "cache")
    arr = np.load(npy)
    if damage == "nan":
        arr[1, 3] = np.nan
    elif damage == "float32":
        arr = arr.astype(np.float32)
    elif damage == "narrow":
        arr = arr[:, :16].copy()
    else:  # one finite value changed: only the digest tells
        arr[0, 0] = -arr[0, 0] if arr[0, 0] else 0.5
    np.save(npy, arr)
    enc = TextEncoder(text, cache_dir=tmp_path / "cache")
    got = enc.encode(texts)
    assert torch.equal(got, good) and enc.loads == 1
    assert npy.is_file() and f"{npy} is damaged" in caplog.text  # left for inspection, named in a warning
    again = TextEncoder(text, cache_dir=tmp_path / "cache")
    assert torch.equal(again.encode(texts), good) and again.loads == 0  # recomputed once, not every run


def test_checks_apply_to_a_cache_written_before_the_index(tmp_path):
    """A folder of chunks from 8a825a2 (no index) is imported once; a non-finite row is refused."""
    from flame.errors import FlameError

    folder = tmp_path / "space"
    folder.mkdir()
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((3, 8)).astype(np.float16)
    vecs[2, 0] = np.inf
    np.save(folder / "chunk-1-0123456789ab.npy", vecs)
    (folder / "chunk-1-0123456789ab.keys.json").write_text(json.dumps(["a", "b", "c"]))
    space = _Space(folder, {}, dim=8)
    assert space.missing(["a", "b", "c", "d"]) == ["d"]
    assert np.array_equal(space.get(["b", "a"]), vecs[[1, 0]].astype(np.float32))
    with pytest.raises(FlameError, match="not finite"):
        space.get(["c"])


def test_a_planted_chunk_does_not_shadow_an_entry(llm_a, tmp_path):
    text = text_side(llm_a, None)
    good = TextEncoder(text, cache_dir=tmp_path / "cache").encode(["a cat"])
    folder = _only_chunk(tmp_path / "cache").parent
    poison = np.ones((1, 32), np.float16) / np.sqrt(32)
    np.save(folder / "chunk-0-000000000000.npy", poison)  # sorts before any real chunk name
    (folder / "chunk-0-000000000000.keys.json").write_text(json.dumps(["a cat"]))
    enc = TextEncoder(text, cache_dir=tmp_path / "cache")
    assert torch.equal(enc.encode(["a cat"]), good) and enc.loads == 0


_MANY = """
import os, resource, sys
import flame.textenc as te
try:
    import flame.store.textcache as tc
    tc.CHUNK = 2  # chunks of 2 are full: no compaction
except ImportError:
    pass
te.CHUNK = 2
from support.untrusted import text_side
enc = te.TextEncoder(text_side(sys.argv[1], None), cache_dir=sys.argv[2], device="cpu")
enc._load()
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
texts = [f"caption number {i}" for i in range(400)]
v = enc.encode(texts)
print("OK", tuple(v.shape), len(os.listdir("/proc/self/fd")))
"""


def test_one_encode_of_more_chunks_than_descriptors(llm_a, tmp_path):
    """400 texts in chunks of 2 (200 chunk files) under a limit of 64 open files (8a825a2 kept one
    memory map, so one descriptor, per chunk: the scaled-down form of >500k texts in chunks of 512)."""
    out = subprocess.run([sys.executable, "-c", _MANY, str(llm_a), str(tmp_path / "cache")], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.startswith("OK (400, 32)"), out.stdout + out.stderr[-1500:]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 200
    assert int(out.stdout.split()[-1]) < 64


def test_a_lookup_reads_only_the_captions_asked_for(tmp_path):
    rng = np.random.default_rng(0)
    writer = _Space(tmp_path / "space", {"test": 1})
    for c in range(40):
        writer.add([f"caption {c}-{i}" for i in range(100)], rng.standard_normal((100, 4)).astype(np.float32))
    reader = _Space(tmp_path / "space", {"test": 1})
    assert reader.missing(["caption 7-7", "never written"]) == ["never written"]
    assert len(reader.index) <= 2  # 8a825a2 indexed all 4,000 entries of the space here
    assert reader.get(["caption 39-99"]).shape == (1, 4)
