"""FlameModel for users (from_pretrained, preprocess, encode_image, encode_text) and the text side at
inference (flame.textenc.TextEncoder: recorded LLM/layer/prompts, fingerprint check, disk cache)."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import flame
from flame.errors import FlameError
from flame.model import FlameModel
from flame.prompts import PROMPT_SETS, PromptSet
from flame.textenc import TextEncoder
from flame.vision import TowerConfig

LAYER = [2]
TEXTS = ["A dog runs along a beach at sunset.", "a red car", 'A "quoted" question?', "a red car"]


def text_side(llm_dir: Path, fingerprint: str | None, prompt_sets=None, layer=LAYER) -> dict:
    """What `flame embed` records in a store manifest (and training copies into config.json)."""
    sets = prompt_sets or [{**PROMPT_SETS[n].to_dict(), "source": "txt"} for n in ("raw", "short", "long")]
    return {"llm": {"spec": str(llm_dir), "fingerprint": fingerprint}, "layer": layer, "positions": "restart",
            "prompt_sets": sets, "facets": [f"{s['name']}/{i}" for s in sets for i in range(len(s["facets"]))],
            "k": sum(len(s["facets"]) for s in sets), "dim": 32, "normalized": True}


def tiny_model(text: dict, seed: int = 0) -> FlameModel:
    torch.manual_seed(seed)
    return FlameModel(TowerConfig("vit-tiny", embed_dim=32, proj_hidden=32, image_size=32), text)


@pytest.fixture(scope="module")
def llm(tiny_llm_dir):
    from flame.llm import llm_fingerprint, load_llm

    model, tokenizer = load_llm(str(tiny_llm_dir), device="cpu")
    return model, tokenizer, llm_fingerprint(model)


@pytest.fixture(scope="module")
def text(tiny_llm_dir, llm) -> dict:
    return text_side(tiny_llm_dir, llm[2])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text) -> Path:
    """A run folder as `flame train` leaves it (written by train's own checkpoint writer)."""
    from flame.train import save_checkpoint

    run = tmp_path_factory.mktemp("run")
    for step in (5, 10):
        save_checkpoint(run, step, tiny_model(text, seed=step), {"step": step}, keep=0)
    return run


def photos(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(50, 40), (31, 64), (32, 32), (97, 45)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------
def test_from_pretrained_run_folder_means_latest_checkpoint(run_dir):
    latest = flame.FlameModel.from_pretrained(run_dir)
    assert latest.source == run_dir / "checkpoint-10"
    assert not latest.training
    ref10, ref5 = tiny_model(latest.text, seed=10), tiny_model(latest.text, seed=5)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(latest.encode_image(x), ref10.eval().encode_image(x))
    older = FlameModel.from_pretrained(run_dir / "checkpoint-5")
    assert torch.equal(older.encode_image(x), ref5.eval().encode_image(x))
    assert older.fingerprint != latest.fingerprint and len(latest.fingerprint) == 16
    # the fingerprint is the weights file's hash: a reload of the same folder gives the same one
    assert FlameModel.from_pretrained(run_dir / "checkpoint-10").fingerprint == latest.fingerprint
    # a model that was never saved is fingerprinted from its weights
    assert tiny_model(latest.text, seed=10).fingerprint == tiny_model(latest.text, seed=10).fingerprint
    assert tiny_model(latest.text, seed=10).fingerprint != tiny_model(latest.text, seed=5).fingerprint


def test_from_pretrained_without_latest_marker_takes_highest_step(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "latest").unlink()
    assert FlameModel.from_pretrained(run).source == run / "checkpoint-10"


@pytest.mark.parametrize("case", ["empty", "missing", "other-json", "no-weights", "bad-weights"])
def test_not_a_flame_checkpoint_is_one_flame_error(case, tmp_path, text):
    bad = tmp_path / "bad"
    if case != "missing":
        bad.mkdir()
    if case == "other-json":
        (bad / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    if case in ("no-weights", "bad-weights"):
        tiny_model(text).save(bad)
        (bad / "model.safetensors").unlink()
        if case == "bad-weights":
            (bad / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(FlameError) as err:
        FlameModel.from_pretrained(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------
def test_preprocess_is_open_clips_eval_transform(run_dir):
    from open_clip.transform import image_transform

    model = FlameModel.from_pretrained(run_dir)
    ref = image_transform(model.image_size, is_train=False, mean=model.mean, std=model.std)
    for im in photos(4):
        got = model.preprocess(im)
        assert got.shape == (3, 32, 32) and got.dtype == torch.float32
        assert torch.equal(got, ref(im))
    # any PIL mode is converted to RGB first
    assert model.preprocess(photos(1)[0].convert("L")).shape == (3, 32, 32)


def test_encode_image_pil_equals_preprocessed_tensor(run_dir):
    model = FlameModel.from_pretrained(run_dir)
    ims = photos(4)
    from_pil = model.encode_image(ims)
    batch = torch.stack([model.preprocess(im) for im in ims])
    from_tensor = model.encode_image(batch)
    assert from_pil.shape == (4, 32) and from_pil.dtype == torch.float32
    assert torch.equal(from_pil, from_tensor)
    assert torch.allclose(from_pil.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(model.encode_image(batch, batch_size=3), from_tensor, atol=1e-6)
    assert torch.allclose(model.encode_image(ims[1]), from_pil[1:2], atol=1e-6)  # one image
    assert torch.allclose(model.encode_image(ims, batch_size=3), from_pil, atol=1e-6)  # PIL lists in batches
    assert model.encode_image([]).shape == (0, 32) and model.image_features([]).shape == (0, 96)
    feats = model.image_features(ims)
    assert feats.shape == (4, model.visual.trunk.width)
    assert torch.allclose(feats, model.visual.features(batch), atol=1e-6)
    with pytest.raises(FlameError, match=r"\[B, 3, S, S\]"):
        model.encode_image(torch.zeros(3, 32, 32))


# ---------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------
def reference_text(llm, prompts: PromptSet, texts, layer=LAYER) -> torch.Tensor:
    """FLAME.md section 6 computed directly: FacetEncoder facets -> mean -> L2 norm."""
    from flame.facets import FacetEncoder

    enc = FacetEncoder(llm[0], llm[1], prompts=prompts, layer=layer, positions="restart")
    return F.normalize(enc.encode(texts).mean(dim=1), dim=-1)


@pytest.mark.parametrize("prompts", ["raw", "long"])
def test_encode_text_is_mean_of_facets_then_norm(prompts, run_dir, llm, tmp_path):
    model = FlameModel.from_pretrained(run_dir, cache_dir=tmp_path / "cache")
    assert not model.text_encoder.llm_loaded  # lazy: nothing loaded before a text must be encoded
    got = model.encode_text(TEXTS, prompts=prompts)
    ref = reference_text(llm, PROMPT_SETS[prompts], TEXTS)
    assert got.shape == (4, 32) and got.dtype == torch.float32
    assert torch.allclose(got.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert torch.allclose(got, ref, atol=2e-3)  # the cache holds float16
    assert torch.equal(got[1], got[3])
    if prompts == "long":  # the K-facet mean is not any single facet
        raw = reference_text(llm, PROMPT_SETS["raw"], TEXTS)
        assert (got - raw).abs().max() > 0.05
    assert model.text_encoder.llm_loaded


def test_recorded_caption_cap_is_used_at_inference(text, llm, tmp_path):
    """A store made with --max-caption-tokens N records N; encode_text must cut captions the same way."""
    from flame.facets import FacetEncoder

    long_caption = ["a red car on a street " * 40]
    capped = TextEncoder({**text, "max_caption_tokens": 8}, cache_dir=tmp_path / "cache")
    default = TextEncoder(text, cache_dir=tmp_path / "cache")
    enc = FacetEncoder(llm[0], llm[1], prompts="raw", layer=LAYER, positions="restart", max_caption_tokens=8)
    ref = F.normalize(enc.encode(long_caption).mean(dim=1), dim=-1)
    got = capped.encode(long_caption, prompts="raw")
    assert torch.allclose(got, ref, atol=2e-3)
    assert (default.encode(long_caption, prompts="raw") - got).abs().max() > 0.01  # another cache entry


def test_second_evaluation_never_loads_the_llm(text, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = TextEncoder(text, cache_dir=cache)
    a = first.encode(TEXTS, prompts="long")
    assert first.loads == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the LLM was loaded")

    monkeypatch.setattr("flame.llm.load_llm", refuse)
    second = TextEncoder(text, cache_dir=cache)  # a fresh encoder (a new process would do the same)
    assert second.missing(TEXTS, "long") == []
    b = second.encode(TEXTS, prompts="long")
    assert torch.equal(a, b)
    assert not second.llm_loaded and second.loads == 0
    assert torch.equal(second.encode(TEXTS[1:2], "long")[0], a[1])  # subsets and order
    with pytest.raises(AssertionError, match="the LLM was loaded"):  # the patch does bite on a miss
        second.encode(["something new"], "long")


def test_cache_key_covers_prompt_texts_layer_and_llm(text, tmp_path):
    cache = tmp_path / "cache"
    base = TextEncoder(text, cache_dir=cache)
    base.encode(TEXTS, "raw")
    assert base.missing(TEXTS, "raw") == []
    raw = PROMPT_SETS["raw"]
    edited = PromptSet("raw", raw.prefix, (raw.facets[0].replace("one word", "a word"),))
    assert base.missing(TEXTS, edited) == list(dict.fromkeys(TEXTS))
    assert TextEncoder({**text, "layer": [1]}, cache_dir=cache).missing(TEXTS, "raw") == list(dict.fromkeys(TEXTS))
    other_llm = {**text, "llm": {**text["llm"], "fingerprint": "0123456789abcdef"}}
    assert TextEncoder(other_llm, cache_dir=cache).missing(TEXTS, "raw") == list(dict.fromkeys(TEXTS))
    # a recorded prompt set (a converted release model) wins over the built-in one of that name
    recorded = [{"name": "raw", "prefix": "Photo : {cap} ; ", "facets": [raw.facets[0]], "sep": ""}]
    conv = TextEncoder(text_side(Path(text["llm"]["spec"]), None, prompt_sets=recorded), cache_dir=cache)
    assert conv.prompt_set("raw").prefix == "Photo : {cap} ; "
    assert conv.prompt_set("long") == PROMPT_SETS["long"]
    assert conv.missing(TEXTS, "raw") == list(dict.fromkeys(TEXTS))
    assert not conv.llm_loaded  # missing() never loads the LLM


def test_llm_fingerprint_mismatch_needs_force(text, tmp_path):
    wrong = {**text, "llm": {**text["llm"], "fingerprint": "0123456789abcdef"}}
    enc = TextEncoder(wrong, cache_dir=tmp_path / "cache")
    with pytest.raises(FlameError, match="force") as err:
        enc.encode(["a cat"])
    assert "0123456789abcdef" in str(err.value) and text["llm"]["fingerprint"] in str(err.value)
    assert not enc.llm_loaded
    forced = TextEncoder(wrong, cache_dir=tmp_path / "cache", force=True)
    assert forced.encode(["a cat"]).shape == (1, 32)


def test_an_llm_of_another_width_is_refused_even_when_forced(text, tmp_path):
    from conftest import build_tiny_llm

    narrow = build_tiny_llm(tmp_path / "narrow", hidden=16)
    enc = TextEncoder(text, cache_dir=tmp_path / "cache", llm=str(narrow), force=True)
    with pytest.raises(FlameError, match="hidden size 16.*D=32"):
        enc.encode(["a cat"])
    assert not enc.llm_loaded


def test_a_legacy_fingerprint_is_accepted(text, llm, tmp_path):
    """Models trained on stores stamped with the old (dtype-dependent) fingerprint still work."""
    from flame.llm import legacy_llm_fingerprint

    old = {**text, "llm": {**text["llm"], "fingerprint": legacy_llm_fingerprint(llm[0])}}
    assert old["llm"]["fingerprint"] != text["llm"]["fingerprint"]
    assert TextEncoder(old, cache_dir=tmp_path / "cache").encode(["a cat"]).shape == (1, 32)


def test_unload_frees_the_llm(text, tmp_path):
    enc = TextEncoder(text, cache_dir=tmp_path / "cache")
    enc.encode(["a cat on a mat"], "short")
    assert enc.llm_loaded
    ref = weakref.ref(enc._llm[0])
    enc.unload()
    gc.collect()
    assert not enc.llm_loaded and ref() is None
    assert torch.equal(enc.encode(["a cat on a mat"], "short"), enc.encode(["a cat on a mat"], "short"))
    assert not enc.llm_loaded  # served from the cache


def test_cache_chunks_compact_and_stay_readable_by_other_readers(tmp_path, monkeypatch):
    """The cache's storage without any LLM: many small writes, compaction, a second reader."""
    import flame.store.textcache as tc
    import flame.textenc as te

    monkeypatch.setattr(tc, "COMPACT_AT", 3)
    rng = np.random.default_rng(0)
    writer = te._Space(tmp_path / "space", {"test": 1})
    reader = te._Space(tmp_path / "space", {"test": 1})
    expected = {}
    for i in range(8):
        caps = [f"caption {i}-{j} \u6771\u4eac\n" for j in range(5)]
        vecs = rng.standard_normal((5, 16)).astype(np.float32)
        writer.add(caps, vecs)
        expected.update(zip(caps, vecs))
        if i == 2:
            assert reader.missing(list(expected)) == []  # sees chunks written by another writer
    chunks = list((tmp_path / "space").glob("*.keys.json"))
    assert len(chunks) <= 4  # 8 chunks were written; small ones were merged
    caps = list(expected)
    want = np.stack([expected[c] for c in caps]).astype(np.float16).astype(np.float32)
    assert np.array_equal(writer.get(caps), want)
    fresh = te._Space(tmp_path / "space", {"test": 1})
    fresh.refresh()
    assert np.array_equal(fresh.get(caps[::-1]), want[::-1])
    # the early reader's chunks were merged away under it: it rebuilds its index and still answers
    assert reader.missing(caps) == []
    assert np.array_equal(reader.get(caps), want)
    # a damaged chunk is one clear error naming the file to delete
    one = next((tmp_path / "space").glob("*.npy"))
    one.write_bytes(one.read_bytes()[:100])
    damaged = te._Space(tmp_path / "space", {})
    damaged.refresh()
    with pytest.raises(FlameError, match=f"{one.name} is damaged"):
        damaged.get(caps)


def test_encode_text_accepts_one_string_and_rejects_non_strings(text, tmp_path):
    enc = TextEncoder(text, cache_dir=tmp_path / "cache")
    assert enc.encode("a red car").shape == (1, 32)
    with pytest.raises(FlameError):
        enc.encode([b"bytes"])
    assert enc.encode([]).shape == (0, 32)


def _vector_of(caption: str) -> np.ndarray:
    seed = int.from_bytes(caption.encode()[-4:].rjust(4, b"\0"), "little")
    return np.random.default_rng(seed).standard_normal(16).astype(np.float32)


def _writer_process(folder: str, start: int) -> None:
    import flame.store.textcache as tc
    import flame.textenc as te

    tc.COMPACT_AT = 3  # compact often, while the other process reads and writes
    space = te._Space(Path(folder), {"test": 1})
    for i in range(start, start + 30):
        caps = [f"caption {(i + j) % 45:04d}" for j in range(4)]  # overlaps the other writer's captions
        missing = space.missing(caps)
        if missing:
            space.add(missing, np.stack([_vector_of(c) for c in missing]))
        assert np.array_equal(space.get(caps), np.stack([_vector_of(c) for c in caps]).astype(np.float16)
                              .astype(np.float32))


def test_two_processes_share_one_cache_while_compacting(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer_process, args=(str(tmp_path / "space"), s)) for s in (0, 15)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    from flame.textenc import _Space

    reader = _Space(tmp_path / "space", {})
    caps = [f"caption {i:04d}" for i in range(45)]
    assert reader.missing(caps) == []
    want = np.stack([_vector_of(c) for c in caps]).astype(np.float16).astype(np.float32)
    assert np.array_equal(reader.get(caps), want)
    assert not list((tmp_path / "space").glob("*.tmp"))


@pytest.mark.slow
def test_builtin_smollm2_text_side(flame_cache, tmp_path):
    """The default LLM by its built-in name: fingerprint check passes, vectors equal the direct facet mean."""
    from flame.llm import llm_fingerprint, load_llm

    model, tok = load_llm("smollm2-135m", device="cpu")
    text = {"llm": {"spec": "smollm2-135m", "fingerprint": llm_fingerprint(model)}, "layer": [29],
            "positions": "restart", "prompt_sets": [PROMPT_SETS["short"].to_dict()], "dim": 576}
    got = TextEncoder(text, cache_dir=tmp_path / "cache", device="cpu").encode(TEXTS[:3], "short")
    want = reference_text((model, tok), PROMPT_SETS["short"], TEXTS[:3], layer=[29])
    assert torch.allclose(got, want, atol=2e-3)
