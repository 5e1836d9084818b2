"""The on-disk formats written by flame 0.1.0 (tests/fixtures/v0, made by its make_fixtures.py) are still
read, and resumed, exactly as that code did: embedding stores (fp16, int8), a training run folder (two
checkpoints, resumed to a later step), a converted release model, the text-vector cache and a search index.

Every test works on a copy of the fixtures in tmp_path, with the working directory there (the commands were
given relative paths when the fixtures were made, so train-config.json and the manifests hold no machine
path). Expected values are the ones the fixtures' own code read back, recorded in expected.json and
expected/*.npy: never recomputed by the code under test. Only public entry points are used: `flame.cli.main`
(embed, train, search), `flame.EmbeddingStore`, `flame.FlameModel`, `flame.TextEncoder`.

Path- and machine-dependent parts of the fixtures, and how the tests cope:
- search/index/files.json "root" is the absolute photo folder of the build: left as it is (today's code
  uses it only for the query's header line and the HTML thumbnails, which are not checked); the photos'
  mtimes (in files.json) are restored on the copy from expected.json, since git does not keep them;
- the LLM is recorded as "tiny-llm", relative: no such folder exists in tmp_path except in the embed
  test, which rebuilds it with conftest.build_tiny_llm and checks its fingerprint first.
- run/checkpoint-2 has no state.pt (removed for size, see make_fixtures.py): its model is loaded, the
  resume starts from checkpoint-4.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support.commands import run_flame

import flame

FIXTURES = Path(__file__).parents[1] / "fixtures" / "v0"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
RESULT = re.compile(r"^\s*(\d+)\s+(-?\d+\.\d+)\s+(\S.*)$")


def expected(rel: str) -> np.ndarray:
    return np.load(FIXTURES / rel)


def copy(tmp_path: Path, *names: str) -> Path:
    """Copy fixture folders/files into tmp_path (same relative layout); returns tmp_path."""
    for name in names:
        src, dst = FIXTURES / name, tmp_path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    return tmp_path


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".lock")}


def run_cli(capsys, *argv):
    return run_flame(capsys, *argv)


@pytest.fixture
def no_llm(monkeypatch):
    """Any attempt to load an LLM fails the test (the spec "tiny-llm" names nothing in tmp_path either)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"an LLM was loaded: load_llm{args}")

    monkeypatch.setattr(importlib.import_module(flame.load_llm.__module__), "load_llm", refuse)


@pytest.fixture
def encoded_images(monkeypatch):
    """Counts the images that reach FlameModel.encode_image."""
    seen = {"images": 0}
    original = flame.FlameModel.encode_image

    def encode_image(self, images, *args, **kwargs):
        seen["images"] += len(images)
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(flame.FlameModel, "encode_image", encode_image)
    return seen


def test_fixtures_are_the_recorded_ones():
    """Guards the fixtures themselves: the committed model weights are the ones the values were recorded with."""
    run = EXPECTED["run"]
    assert (FIXTURES / "run" / "latest").read_text().strip() == run["latest"] == "checkpoint-4"
    for name, rec in run["checkpoints"].items():
        assert flame.FlameModel.from_pretrained(FIXTURES / "run" / name).fingerprint == rec["fingerprint"]
    assert not (FIXTURES / "run" / "checkpoint-2" / "state.pt").exists()
    assert (FIXTURES / "run" / "checkpoint-4" / "state.pt").is_file()


# ---------------------------------------------------------------------------------------------------------
# embedding stores
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_store_reads_back_the_recorded_vectors(tmp_path, dtype):
    rec = EXPECTED["stores"][dtype]
    store = flame.EmbeddingStore(copy(tmp_path, f"store-{dtype}") / f"store-{dtype}")
    store.validate()
    assert store.shards == rec["shards"]
    assert (store.k, store.dim, store.dtype, store.facet_names, len(store)) == (
        rec["k"], rec["dim"], rec["dtype"], rec["facets"], rec["len"])
    assert store.manifest["llm"] == {"spec": "tiny-llm", "fingerprint": EXPECTED["stores"]["llm"]["fingerprint"]}
    want = expected(rec["vectors"])
    got = np.concatenate([store.get(name, slice(None)) for name in store.shards])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)  # fp16 -> float32 and int8 * scale are exact
    start = 0
    for name in store.shards:
        keys = store.keys(name)
        assert keys == rec["keys"][name]
        assert str(store.array(name).dtype) == rec["raw_dtype"]
        assert store.array(name).shape == (len(keys), rec["k"], rec["dim"])
        assert (store.scales(name) is None) == (dtype == "fp16")
        rows = np.array([0, len(keys) - 1, 2])  # unsorted rows, a facet subset
        np.testing.assert_array_equal(store.get(name, rows, facets=[1, 3]), want[start + rows][:, [1, 3]])
        start += len(keys)
    offsets = dict(zip(rec["shards"], np.cumsum([0] + [len(rec["keys"][n]) for n in rec["shards"]])))
    for name, key, row in rec["probe"]:
        assert store.index(name).get(key) == row and key in store.index(name)
        np.testing.assert_array_equal(store.get(name, row), want[offsets[name] + row])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_embed_resumes_the_store(tmp_path, monkeypatch, capsys, dtype):
    """`flame embed` with the fixture's command accepts the store as its own (nothing recomputed or
    rewritten), and completes a shard removed from it next to the untouched one."""
    from conftest import build_tiny_llm

    from flame.llm import llm_fingerprint

    rec, llm = EXPECTED["stores"][dtype], EXPECTED["stores"]["llm"]
    copy(tmp_path, "data", f"store-{dtype}")
    monkeypatch.chdir(tmp_path)
    build_tiny_llm(tmp_path / llm["spec"], **llm["build_tiny_llm"])
    fingerprint = llm_fingerprint(flame.load_llm(llm["spec"], device="cpu")[0])
    assert fingerprint == llm["fingerprint"], (
        "conftest.build_tiny_llm no longer builds the LLM the fixtures were made with (a changed builder, "
        "torch or transformers): this test cannot run, the formats are not at fault")
    store_dir = tmp_path / f"store-{dtype}"
    before = files_of(store_dir)
    argv = ["embed", *EXPECTED["stores"]["embed_args"], "--out", store_dir.name, "--dtype", dtype]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert files_of(store_dir) == before  # nothing recomputed, nothing rewritten (the manifest included)

    last = rec["shards"][-1]
    for p in (store_dir / "shards").glob(f"{last}.*"):
        p.unlink()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    after = files_of(store_dir)
    assert {k: v for k, v in after.items() if last not in k} == {k: v for k, v in before.items() if last not in k}
    store = flame.EmbeddingStore(store_dir)
    assert store.shards == rec["shards"] and store.keys(last) == rec["keys"][last]
    want = expected(rec["vectors"])
    n_first = len(rec["keys"][rec["shards"][0]])
    np.testing.assert_array_equal(store.get(rec["shards"][0], slice(None)), want[:n_first])
    # recomputed by the LLM: equal up to the stored precision
    np.testing.assert_allclose(store.get(last, slice(None)), want[n_first:], atol=5e-3 if dtype == "int8" else 2e-3)


# ---------------------------------------------------------------------------------------------------------
# models: run checkpoints and a converted release checkpoint
# ---------------------------------------------------------------------------------------------------------
def check_model(model, rec: dict, inputs: np.ndarray) -> None:
    x = torch.from_numpy(inputs)
    assert model.fingerprint == rec["fingerprint"]
    assert model.image_size == rec["image_size"] and model.tower_config.embed_dim == rec["embed_dim"]
    np.testing.assert_allclose(model.encode_image(x).numpy(), expected(rec["encode_image"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.image_features(x).numpy(), expected(rec["image_features"]), atol=1e-5, rtol=0)
    assert model.logit_scale.item() == pytest.approx(rec["logit_scale"], abs=1e-6)
    assert model.logit_bias.item() == pytest.approx(rec["logit_bias"], abs=1e-6)


@pytest.mark.parametrize("name", ["checkpoint-2", "checkpoint-4"])
def test_run_checkpoint_gives_the_recorded_embeddings(tmp_path, name):
    rec = EXPECTED["run"]["checkpoints"][name]
    run = copy(tmp_path, "run") / "run"
    model = flame.FlameModel.from_pretrained(run / name)
    assert not model.training
    check_model(model, rec, np.load(FIXTURES / "inputs-32.npy"))
    assert model.text["llm"] == {"spec": "tiny-llm", "fingerprint": EXPECTED["stores"]["llm"]["fingerprint"]}
    assert model.text["k"] == 4 and model.text["dim"] == 32
    if "photos" in rec:  # PIL images through the recorded transform (size, mean, std in config.json)
        from PIL import Image

        images = []
        for rel in rec["photos"]:
            with Image.open(FIXTURES / "search" / "photos" / rel) as im:
                images.append(im.copy())
        np.testing.assert_allclose(model.encode_image(images).numpy(), expected(rec["encode_photos"]), atol=1e-5,
                                   rtol=0)


def test_run_folder_loads_its_latest_checkpoint(tmp_path):
    rec = EXPECTED["run"]["from_run_folder"]
    run = copy(tmp_path, "run") / "run"
    model = flame.FlameModel.from_pretrained(run)
    assert Path(model.source).name == EXPECTED["run"]["latest"]
    check_model(model, rec, np.load(FIXTURES / "inputs-32.npy"))


def test_converted_model_gives_the_recorded_embeddings(tmp_path):
    rec = EXPECTED["converted"]
    model = flame.FlameModel.from_pretrained(copy(tmp_path, "converted") / "converted")
    check_model(model, rec, np.load(FIXTURES / "inputs-16.npy"))
    assert model.text == rec["text"]
    assert model.text["llm"] == {"spec": "mistralai/Mistral-Nemo-Instruct-2407", "fingerprint": None}


@pytest.mark.slow
def test_train_resume_continues_the_run(tmp_path, monkeypatch, capsys):
    """The run was killed after checkpoint-4 of 6 planned steps. `flame train --resume` with the same
    command takes train-config.json as matching, continues from checkpoint-4's state.pt and ends at
    step 6 with the weights the uninterrupted run had (recorded; bit-exact on the machine that made them)."""
    rec = EXPECTED["run"]
    copy(tmp_path, "data", "store-fp16", "run")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    # the recorded settings are read: a changed one is refused, nothing is written
    code, _, err = run_cli(capsys, "train", *rec["train_args"], "--lr", "0.01", "--resume")
    assert code == 2 and "lr" in err, err
    assert (run / "latest").read_text().strip() == "checkpoint-4" and not (run / "checkpoint-6").exists()

    code, _, err = run_cli(capsys, "train", *rec["train_args"], "--resume")
    assert code == 0, err
    assert (run / "latest").read_text().strip() == "checkpoint-6"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # --keep 2
    assert json.loads((run / "checkpoints.json").read_text())["written"] == ["checkpoint-4", "checkpoint-6"]
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [2, 4, 6]
    model = flame.FlameModel.from_pretrained(run)
    assert Path(model.source).name == "checkpoint-6"
    got = model.encode_image(torch.from_numpy(np.load(FIXTURES / "inputs-32.npy"))).numpy()
    # 1e-4 leaves room for another CPU's rounding over two steps; a resume that restarted the epoch's data
    # moves the result by ~5e-3, one that lost the optimizer or scheduler state by 2e-2..6e-2
    np.testing.assert_allclose(got, expected(rec["resumed"]["encode_image"]), atol=1e-4, rtol=0)
    # checkpoint-4 was not touched by the resume
    check_model(flame.FlameModel.from_pretrained(run / "checkpoint-4"), rec["checkpoints"]["checkpoint-4"],
                np.load(FIXTURES / "inputs-32.npy"))


# ---------------------------------------------------------------------------------------------------------
# the text-vector cache
# ---------------------------------------------------------------------------------------------------------
def test_text_cache_is_hit_without_the_llm(tmp_path, monkeypatch, no_llm):
    rec = EXPECTED["text_cache"]
    copy(tmp_path, "run", "text-cache")
    monkeypatch.chdir(tmp_path)  # the recorded LLM spec "tiny-llm" names nothing here
    model = flame.FlameModel.from_pretrained(tmp_path / rec["model"], cache_dir=tmp_path / "text-cache")
    encoder = flame.TextEncoder(model.text, cache_dir=tmp_path / "text-cache")
    for prompts, rel in rec["prompts"].items():
        want = expected(rel)
        assert encoder.missing(rec["texts"], prompts) == []
        np.testing.assert_allclose(encoder.encode(rec["texts"], prompts).numpy(), want, atol=1e-6, rtol=0)
        # through the model, in another order and with a repeat
        order = [3, 0, 0, 7]
        got = model.encode_text([rec["texts"][i] for i in order], prompts=prompts).numpy()
        np.testing.assert_allclose(got, want[order], atol=1e-6, rtol=0)
    assert not encoder.llm_loaded and not model.text_encoder.llm_loaded
    # the guard works: a text that is not cached needs the LLM
    with pytest.raises(AssertionError, match="an LLM was loaded"):
        encoder.encode(["a text that is not in the cache"], "raw")


# ---------------------------------------------------------------------------------------------------------
# the search index
# ---------------------------------------------------------------------------------------------------------
def _query(capsys, query: dict) -> list[list]:
    code, out, err = run_cli(capsys, *query["args"])
    assert code == 0, err
    return [[m.group(3), float(m.group(2))] for m in map(RESULT.match, out.splitlines()) if m]


def _check_results(got: list[list], want: list[list]) -> None:
    assert [r[0] for r in got] == [r[0] for r in want]
    np.testing.assert_allclose([r[1] for r in got], [r[1] for r in want], atol=2e-4, rtol=0)  # printed to 4 places


def test_search_index_answers_the_recorded_queries(tmp_path, monkeypatch, capsys, no_llm):
    rec = EXPECTED["search"]
    copy(tmp_path, "run", "text-cache", "search")
    monkeypatch.chdir(tmp_path)
    assert rec["queries"]
    for query in rec["queries"]:
        _check_results(_query(capsys, query), query["results"])


def test_search_index_is_reused_by_a_rerun(tmp_path, monkeypatch, capsys, no_llm, encoded_images):
    """files.json is read: with the photos' recorded mtimes restored, a rerun of `flame search index`
    encodes nothing and keeps every stored vector; the index still answers as recorded."""
    rec = EXPECTED["search"]
    copy(tmp_path, "run", "text-cache", "search")
    monkeypatch.chdir(tmp_path)
    for rel in rec["photos"]:
        os.utime(tmp_path / "search" / "photos" / rel, ns=(rec["photo_mtime_ns"], rec["photo_mtime_ns"]))
    shards = sorted(p.name for p in (tmp_path / "search" / "index" / "shards").iterdir())
    code, _, err = run_cli(capsys, *rec["index_args"])
    assert code == 0, err
    assert encoded_images["images"] == 0  # every photo's stored vector reused
    assert sorted(p.name for p in (tmp_path / "search" / "index" / "shards").iterdir()) == shards
    for query in rec["queries"]:
        _check_results(_query(capsys, query), query["results"])
