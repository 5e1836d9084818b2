"""`flame embed` under faults: poison-pill shards skipped and retried last, NaN vectors refused,
no-flock filesystems, dtype-independent fingerprints, runs that store nothing, the GGUF
conversion under concurrent ranks and after a killed conversion."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support.commands import lines_of, run_flame
from support.embed_data import make_shards, store_files, table_rows, write_table

from flame import llm as flame_llm
from flame.facets import FacetEncoder
from flame.llm import llm_fingerprint, load_llm
from flame.store import EmbeddingStore


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    shards = make_shards(root / "shards", n_shards=3, per_shard=4, seed=5)
    return root, shards


def _embed(capsys, *args):
    return run_flame(capsys, "embed", *args)


def _poison(monkeypatch, bad_caption: str, make):
    """Make the model pass (`FacetEncoder.run`, which `encode` and `flame embed`'s prefetched
    chunks both go through) misbehave for one caption (`make(vectors, row)` edits the result)."""
    from flame.facets import clean_caption

    real = FacetEncoder.run
    bad = clean_caption(bad_caption)

    def run(self, prep, *a, **kw):
        out = real(self, prep, *a, **kw)
        for i, c in enumerate(prep.cleaned):
            if c == bad:
                out = make(out, i)
        return out

    monkeypatch.setattr(FacetEncoder, "run", run)


def _order_spy(monkeypatch) -> list[str]:
    order: list[str] = []
    real = EmbeddingStore.shard_writer

    def shard_writer(self, name, n):
        order.append(name)
        return real(self, name, n)

    monkeypatch.setattr(EmbeddingStore, "shard_writer", shard_writer)
    return order


# ---- poison pills -----------------------------------------------------------------------------
def test_poison_pill_shard_is_skipped_reported_and_retried_last(tmp_path, corpus, tiny_llm_dir, monkeypatch, capsys):
    root, shards = corpus
    bad = shards["data-0000"][1][1]

    def boom(out, i):
        raise ValueError("tokenizer exploded")

    _poison(monkeypatch, bad, boom)
    out = tmp_path / "st"
    args = ["--data", root / "shards", "--llm", tiny_llm_dir, "--out", out]
    code, stdout, err = _embed(capsys, *args)
    lines = lines_of(err)
    assert code == 2 and len(lines) == 2, err
    assert lines[0] == (
        "flame embed: shard data-0000 failed: ValueError: tokenizer exploded (skipped; the other shards go on)"
    )
    assert lines[1].startswith("flame embed: error: 1 shard failed: data-0000")
    assert "shards 2 done / 0 skipped / 1 failed" in stdout
    assert EmbeddingStore(out).shards == ["data-0001", "data-0002"]
    assert json.loads((out / "attempts" / "data-0000.json").read_text()) == {
        "attempts": 1,
        "error": "ValueError: tokenizer exploded",
    }
    # rerun with data-0002 to redo too: the shard that failed before goes last
    (out / "shards" / "data-0002.keys.json").unlink()
    order = _order_spy(monkeypatch)
    code, stdout, err = _embed(capsys, *args)
    assert code == 2 and "shards 1 done / 1 skipped / 1 failed" in stdout
    assert order == ["data-0002", "data-0000"]
    assert json.loads((out / "attempts" / "data-0000.json").read_text())["attempts"] == 2
    # the cause is fixed: the rerun completes it and forgets the failure
    monkeypatch.undo()
    code, stdout, err = _embed(capsys, *args)
    assert code == 0 and "shards 1 done / 2 skipped / 0 failed" in stdout, err
    assert not list((out / "attempts").iterdir())


def test_repeated_unexpected_failures_stop_the_run(tmp_path, corpus, tiny_llm_dir, monkeypatch, capsys):
    """Not a poison pill but a broken setup: every shard fails the same way -> stop, one line."""
    root, _ = corpus
    monkeypatch.setattr(FacetEncoder, "run", lambda self, *a, **kw: (_ for _ in ()).throw(RuntimeError("no")))
    data = tmp_path / "d"
    data.mkdir()
    for i in range(4):
        (data / f"x{i}.tar").write_bytes((root / "shards" / "data-0000.tar").read_bytes())
    code, _, err = _embed(capsys, "--data", data, "--llm", tiny_llm_dir, "--out", tmp_path / "st")
    lines = lines_of(err)
    assert code == 2 and len(lines) == 4, err  # three shard reports, then the stop
    assert "3 shards in a row failed with unexpected errors (last: RuntimeError: no)" in lines[-1]


# ---- non-finite vectors -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_nan_row_from_the_encoder_fails_only_its_shard(tmp_path, corpus, tiny_llm_dir, monkeypatch, capsys, dtype):
    root, shards = corpus
    bad_key, bad = shards["data-0001"][1][0], shards["data-0001"][1][1]

    def nan(out, i):
        out = out.clone()
        out[i, 0, 3] = float("nan")
        return out

    _poison(monkeypatch, bad, nan)
    out = tmp_path / "st"
    code, stdout, err = _embed(capsys, "--data", root / "shards", "--llm", tiny_llm_dir, "--out", out, "--dtype", dtype)
    lines = lines_of(err)
    assert code == 2 and len(lines) == 2, err
    assert lines[0].startswith("flame embed: shard data-0001 failed: 1 of 4 samples have non-finite vectors")
    assert f"first keys: '{bad_key}'" in lines[0]
    assert EmbeddingStore(out).shards == ["data-0000", "data-0002"]
    assert not (out / "shards" / "data-0001.npy").exists() and not list(out.rglob("*.tmp"))


# ---- the lock on filesystems without flock -----------------------------------------------------
def test_lock_falls_back_to_a_lock_file_without_flock(tmp_path, corpus, tiny_llm_dir, monkeypatch, capsys):
    root, _ = corpus

    def no_flock(*a, **kw):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "st"
    args = ["--data", root / "shards", "--llm", tiny_llm_dir, "--out", out]
    # another live job holds the lock file: refused with one line, nothing written
    out.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lock-owner").write_text(f"{socket.gethostname()} {holder.pid}\n")
        code, _, err = _embed(capsys, *args)
        lines = lines_of(err)
        assert code == 2 and len(lines) == 1, err
        assert "being written by another flame embed" in lines[0] and f"pid {holder.pid}" in lines[0]
        assert not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock file is stale, taken over with one note line; the run completes
    code, stdout, err = _embed(capsys, *args)
    lines = lines_of(err)
    assert code == 0, err
    assert len(lines) == 1 and "no flock" in lines[0] and ".lock-owner" in lines[0]
    assert "shards 3 done" in stdout and not (out / ".lock-owner").exists()


# ---- validation -------------------------------------------------------------------------------
def test_fingerprint_does_not_depend_on_the_load_dtype(tiny_llm_dir):
    a, _ = load_llm(str(tiny_llm_dir), device="cpu", dtype=torch.float32)
    b, _ = load_llm(str(tiny_llm_dir), device="cpu", dtype=torch.bfloat16)
    assert llm_fingerprint(a) == llm_fingerprint(b)
    torch.manual_seed(1)
    other = type(a)(a.config)  # other weights: another fingerprint
    assert llm_fingerprint(other) != llm_fingerprint(a)


def test_store_begun_in_bf16_is_finished_in_fp32(tmp_path, corpus, tiny_llm_dir, capsys):
    root, _ = corpus
    out = tmp_path / "st"
    base = ["--llm", tiny_llm_dir, "--out", out]
    code, _, err = _embed(capsys, "--data", root / "shards" / "data-0000.tar", *base, "--llm-dtype", "bfloat16")
    assert code == 0, err
    code, stdout, err = _embed(capsys, "--data", root / "shards", *base, "--llm-dtype", "float32")
    assert code == 0, err
    assert "shards 2 done / 1 skipped / 0 failed" in stdout


def test_store_with_the_old_fingerprint_is_resumed(tmp_path, corpus, tiny_llm_dir, capsys):
    root, _ = corpus
    out = tmp_path / "st"
    base = ["--llm", tiny_llm_dir, "--out", out]
    code, _, err = _embed(capsys, "--data", root / "shards" / "data-0000.tar", *base)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["llm"]["fingerprint"] = flame_llm.legacy_llm_fingerprint(load_llm(str(tiny_llm_dir), device="cpu")[0])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    before = (out / "manifest.json").read_bytes()
    code, stdout, err = _embed(capsys, "--data", root / "shards", *base, "--dry-run")
    assert code == 0 and "1 of 3 shards complete (would be skipped)" in stdout, err
    code, stdout, err = _embed(capsys, "--data", root / "shards", *base)
    assert code == 0 and "shards 2 done / 1 skipped" in stdout, err
    assert (out / "manifest.json").read_bytes() == before


def test_refusal_says_what_overwrite_deletes(tmp_path, corpus, tiny_llm_dir, capsys):
    root, _ = corpus
    out = tmp_path / "st"
    code, _, err = _embed(capsys, "--data", root / "shards", "--llm", tiny_llm_dir, "--out", out)
    assert code == 0, err
    before = store_files(out)
    code, _, err = _embed(capsys, "--data", root / "shards", "--llm", tiny_llm_dir, "--out", out, "--layer", "1")
    (line,) = lines_of(err)
    assert code == 2 and "--overwrite to DELETE its 3 complete shards" in line
    assert store_files(out) == before


def test_a_run_that_stores_nothing_is_an_error(tmp_path, corpus, tiny_llm_dir, capsys):
    root, shards = corpus
    rows = [r for r in table_rows(shards) if not r["__key__"].startswith("0001")]  # data-0001 has no rows
    table = write_table(tmp_path / "recap.jsonl", rows)
    out = tmp_path / "st"
    args = ["--data", root / "shards", "--captions", f"recap={table}", "--prompts", "long=recap:long"]
    args += ["--llm", tiny_llm_dir, "--out", out]
    # one shard loses every sample: it fails (not an empty shard marked complete), the others are stored
    code, stdout, err = _embed(capsys, *args)
    lines = lines_of(err)
    assert code == 2 and len(lines) == 2, err
    assert "shard data-0001 failed: all 4 samples lack a caption" in lines[0]
    assert EmbeddingStore(out).shards == ["data-0000", "data-0002"]
    # a table matching nothing: zero samples is never a success
    write_table(tmp_path / "other.jsonl", [{"__key__": "zzz", "long": "x"}])
    out2 = tmp_path / "st2"
    code, _, err = _embed(capsys, *args[:-1], out2, "--captions", f"recap={tmp_path / 'other.jsonl'}")
    lines = lines_of(err)
    assert code == 2 and "3 shards failed" in lines[-1] and EmbeddingStore(out2).shards == []
    # empty tars only: nothing stored, an error too
    import webdataset as wds

    (tmp_path / "e").mkdir()
    wds.TarWriter(str(tmp_path / "e" / "empty.tar")).close()
    code, _, err = _embed(capsys, "--data", tmp_path / "e", "--llm", tiny_llm_dir, "--out", tmp_path / "st3")
    assert code == 2 and "no samples were stored" in lines_of(err)[-1]
    # ...but an empty tar added to a store that holds samples is fine
    done = [root / "shards" / "data-0000.tar", root / "shards" / "data-0002.tar"]
    code, stdout, err = _embed(capsys, "--data", *done, tmp_path / "e" / "empty.tar", *args[2:])
    assert code == 0 and "0 samples, shards 1 done / 2 skipped / 0 failed" in stdout, err


# ---- the GGUF conversion ----------------------------------------------------------------------
@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A fake GGUF conversion (transformers' loaders patched) that takes a while and counts calls."""
    import transformers

    calls = []

    class Saver:
        def __init__(self, what):
            self.what = what
            self.config = SimpleNamespace()
            self.hf_quantizer, self.is_quantized = object(), True

        def save_pretrained(self, folder):
            os.makedirs(folder, exist_ok=True)
            if self.what == "model":
                calls.append(folder)
                time.sleep(0.3)
                (open(os.path.join(folder, "model.safetensors"), "wb")).close()
                with open(os.path.join(folder, "config.json"), "w") as f:
                    f.write("{}")
            else:
                with open(os.path.join(folder, "tokenizer.json"), "w") as f:
                    f.write("{}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: Saver("tok"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: Saver("model"))
    monkeypatch.setenv("FLAME_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF fake")
    return path, calls


def test_concurrent_ranks_convert_a_gguf_file_once(fake_gguf):
    path, calls = fake_gguf
    results = []
    threads = [threading.Thread(target=lambda: results.append(flame_llm._gguf_cached(path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "config.json").is_file()
    assert [p.name for p in results[0].parent.iterdir() if ".tmp" in p.name] == []


def test_killed_conversion_leaves_no_temporary_folder_behind(fake_gguf):
    path, calls = fake_gguf
    target = flame_llm._gguf_cached(path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    # what killed conversions left: a full temporary copy each (this host, old naming, another host)
    stale = [
        target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{dead.pid}"),
        target.with_name(f"{target.name}.tmp{dead.pid}"),
    ]
    for s in stale:
        s.mkdir()
        (s / "model.safetensors").write_bytes(b"\0" * 1000)
    import shutil

    shutil.rmtree(target)
    again = flame_llm._gguf_cached(path)
    assert again == target and len(calls) == 2
    assert not any(s.exists() for s in stale)
    # a complete cache is returned at once, and stale folders of dead processes are still swept
    stale[0].mkdir()
    assert flame_llm._gguf_cached(path) == target and len(calls) == 2 and not stale[0].exists()


def test_a_conversion_without_a_terminal_writes_no_library_progress_bar(fake_gguf, monkeypatch, capsys):
    """transformers draws a tqdm bar over the GGUF tensors; in a log file its carriage returns pile up."""
    import transformers
    from tqdm.auto import tqdm

    path, calls = fake_gguf
    loader = transformers.AutoModelForCausalLM.from_pretrained

    def with_a_bar(*a, **kw):
        for _ in tqdm(range(50), desc="Converting and de-quantizing GGUF tensors...", mininterval=0):
            pass
        return loader(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", with_a_bar)
    assert (flame_llm._gguf_cached(path) / "config.json").is_file() and len(calls) == 1
    err = capsys.readouterr().err
    assert "\r" not in err and "Converting" not in err


def test_tiny_vectors_unchanged(tmp_path, corpus, tiny_llm_dir, capsys):
    """Sanity: the store's vectors are finite and unit-norm after all the checks."""
    root, _ = corpus
    code, _, err = _embed(capsys, "--data", root / "shards", "--llm", tiny_llm_dir, "--out", tmp_path / "st")
    assert code == 0, err
    s = EmbeddingStore(tmp_path / "st")
    v = np.concatenate([s.get(n, np.arange(len(s.keys(n)))) for n in s.shards])
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, atol=2e-3)
