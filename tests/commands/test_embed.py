"""`flame embed`: captions from shards and tables -> store; equality with FacetEncoder,
resume, manifest refusal, locking and every bad-input case."""

from __future__ import annotations

import fcntl
import json
import tarfile

import numpy as np
import pytest
import torch
from support.commands import PROGRESS, one_line, run_flame
from support.embed_data import FAKE_JPEG, make_shards, store_files, table_rows, write_table

from flame.data.captions import CaptionTable, ShardError, read_shard_captions
from flame.errors import FlameError
from flame.store import EmbeddingStore

PROMPTS = ["raw=txt", "short=recap:short", "long=recap:long"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    shards = make_shards(root / "shards")
    write_table(root / "recap.json", table_rows(shards))
    return root, shards


@pytest.fixture(scope="module")
def encoders(tiny_llm_dir):
    from flame.facets import FacetEncoder
    from flame.llm import load_llm

    model, tok = load_llm(str(tiny_llm_dir), device="cpu")
    return {name: FacetEncoder(model, tok, prompts=name, layer=-2) for name in ("raw", "short", "long")}


def _embed(capsys, *args):
    return run_flame(capsys, "embed", *args)


def _expected(encoders, name, captions):
    v = encoders[name].encode(captions)
    return torch.nn.functional.normalize(v, dim=-1).numpy()


# ---- readers ----------------------------------------------------------------------------------
def test_shard_reader_reads_text_members_only(tmp_path, corpus):
    root, shards = corpus
    sc = read_shard_captions(root / "shards" / "data-0001.tar", ["txt"])
    assert sc.keys == [k for k, *_ in shards["data-0001"]]
    assert sc.text["txt"] == {k: t for k, t, *_ in shards["data-0001"]}
    # a sample with only an image is still a key (its caption is "missing")
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "x.tar")) as w:
        w.write({"__key__": "a", "jpg": FAKE_JPEG, "txt": "x"})
        w.write({"__key__": "b", "jpg": FAKE_JPEG})
    sc = read_shard_captions(tmp_path / "x.tar", ["txt"])
    assert sc.keys == ["a", "b"] and sc.text["txt"] == {"a": "x"}


def test_shard_reader_rejects_corrupt_tars(tmp_path, corpus):
    root, _ = corpus
    data = (root / "shards" / "data-0000.tar").read_bytes()
    (tmp_path / "trunc.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 100)
    for name in ("trunc.tar", "junk.tar"):
        with pytest.raises(ShardError, match="unreadable tar"):
            read_shard_captions(tmp_path / name, ["txt"])


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_caption_tables(tmp_path, corpus, suffix):
    _, shards = corpus
    rows = table_rows(shards)
    t = CaptionTable(write_table(tmp_path / f"t{suffix}", rows))
    assert t.column("long") == {r["__key__"]: r["long"] for r in rows}
    with pytest.raises(FlameError, match="no column 'nope'"):
        t.column("nope")
    with pytest.raises(FlameError, match="no key field 'id'"):
        CaptionTable(tmp_path / f"t{suffix}", key_field="id").column("long")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_caption_tables_keep_only_the_wanted_keys(tmp_path, corpus, suffix):
    """A rank keeps only its shards' rows; a column is recognised even if no kept row has it."""
    _, shards = corpus
    rows = table_rows(shards)
    wanted = {rows[0]["__key__"], rows[-1]["__key__"]}
    t = CaptionTable(write_table(tmp_path / f"t{suffix}", rows))
    t.load(["short", "long"], keys=wanted)
    assert t.column("long") == {r["__key__"]: r["long"] for r in rows if r["__key__"] in wanted}
    assert CaptionTable(tmp_path / f"t{suffix}").column("long").keys() == {r["__key__"] for r in rows}
    empty = CaptionTable(tmp_path / f"t{suffix}")
    empty.load(["long"], keys=set())
    assert empty.column("long") == {}


def test_caption_table_keys_are_strings_and_first_row_wins(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"__key__": 7, "c": "a"}, {"__key__": "7", "c": "b"}, {"__key__": "8", "c": None}]))
    t = CaptionTable(path)
    assert t.column("c") == {"7": "a", "8": None} and t.duplicates == 1


# ---- the command ------------------------------------------------------------------------------
def test_embed_equals_facet_encoder_and_resumes(tmp_path, corpus, tiny_llm_dir, encoders, capsys):
    root, shards = corpus
    out = tmp_path / "store"
    args = [
        "--data",
        root / "shards",
        "--captions",
        root / "recap.json",
        "--prompts",
        *PROMPTS,
        "--llm",
        tiny_llm_dir,
        "--out",
        out,
        "--chunk",
        "4",
    ]
    code, stdout, err = _embed(capsys, *args)
    assert code == 0, err
    assert "18 samples, shards 3 done / 0 skipped / 0 failed" in stdout
    assert "3 repeated captions reused" in stdout
    s = EmbeddingStore(out)
    assert s.shards == sorted(shards) and len(s) == 18
    assert s.k == 11 and s.dim == 32 and s.dtype == "fp16"
    assert s.facet_names == ["raw/0", "short/0", "short/1", "short/2"] + [f"long/{i}" for i in range(7)]
    m = s.manifest
    assert m["llm"]["fingerprint"] and m["layer"] == [2] and m["positions"] == "restart" and m["normalized"]
    assert [p["source"] for p in m["prompt_sets"]] == ["txt", "recap.json:short", "recap.json:long"]
    for name, rows in shards.items():
        assert s.keys(name) == [r[0] for r in rows]
        arr = np.asarray(s.array(name), dtype=np.float32)
        want = np.concatenate(
            [
                _expected(encoders, "raw", [r[1] for r in rows]),
                _expected(encoders, "short", [r[2] for r in rows]),
                _expected(encoders, "long", [r[3] for r in rows]),
            ],
            axis=1,
        )
        np.testing.assert_allclose(arr, want, atol=2e-3, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(arr, axis=-1), 1.0, atol=2e-3)
    before = store_files(out)
    # rerun: nothing recomputed, nothing rewritten
    code, stdout, _ = _embed(capsys, *args)
    assert code == 0 and "0 samples, shards 0 done / 3 skipped" in stdout
    assert store_files(out) == before
    # a different layer is refused with one line, nothing lost; --overwrite replaces
    code, _, err = _embed(capsys, *args, "--layer", "1")
    assert code == 2
    assert "different settings (layer" in one_line(err) and "--overwrite" in err
    assert store_files(out) == before
    code, _, err = _embed(capsys, *args, "--layer", "1", "--overwrite", "--prompts", "raw=txt")
    assert code == 0, err
    assert EmbeddingStore(out).manifest["layer"] == [1] and EmbeddingStore(out).k == 1


def test_int8_store_and_table_formats(tmp_path, corpus, tiny_llm_dir, encoders, capsys):
    root, shards = corpus
    table = write_table(tmp_path / "caps.parquet", table_rows(shards))
    out = tmp_path / "st8"
    code, _, err = _embed(
        capsys,
        "--data",
        root / "shards" / "data-{0000..0001}.tar",
        "--captions",
        f"p={table}",
        "--prompts",
        "long=p:long",
        "--llm",
        tiny_llm_dir,
        "--out",
        out,
        "--dtype",
        "int8",
    )
    assert code == 0, err
    s = EmbeddingStore(out)
    assert s.shards == ["data-0000", "data-0001"] and s.array("data-0000").dtype == np.int8
    got = s.get("data-0001", np.arange(6))
    want = _expected(encoders, "long", [r[3] for r in shards["data-0001"]])
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.999


def test_missing_keys(tmp_path, corpus, tiny_llm_dir, capsys):
    root, shards = corpus
    rows = table_rows(shards)
    dropped = shards["data-0002"][1][0]
    write_table(tmp_path / "recap.csv", [r for r in rows if r["__key__"] != dropped])
    base = [
        "--data",
        root / "shards",
        "--captions",
        f"recap={tmp_path / 'recap.csv'}",
        "--prompts",
        *PROMPTS,
        "--llm",
        tiny_llm_dir,
    ]
    # error: one line naming the key; the shards done before it stay complete
    code, _, err = _embed(capsys, *base, "--out", tmp_path / "a", "--on-missing", "error")
    assert code == 2
    line = one_line(err)
    assert dropped in line and "missing" in line and "--on-missing skip" in line
    s = EmbeddingStore(tmp_path / "a")
    assert s.shards == ["data-0000", "data-0001"]
    assert not list((tmp_path / "a").rglob("*.tmp"))
    # skip (default): left out of its shard's rows and counted
    code, stdout, err = _embed(capsys, *base, "--out", tmp_path / "b")
    assert code == 0, err
    assert "1 samples missing a caption (skip)" in stdout
    s = EmbeddingStore(tmp_path / "b")
    assert len(s) == 17 and dropped not in s.keys("data-0002") and len(s.keys("data-0002")) == 5


def test_empty_captions(tmp_path, tiny_llm_dir, encoders, capsys):
    import webdataset as wds

    (tmp_path / "d").mkdir()
    with wds.TarWriter(str(tmp_path / "d" / "e.tar")) as w:
        for key, txt in [("k0", "a dog"), ("k1", "   "), ("k2", "a cat")]:
            w.write({"__key__": key, "jpg": FAKE_JPEG, "txt": txt})
    base = ["--data", tmp_path / "d", "--llm", tiny_llm_dir]
    code, stdout, err = _embed(capsys, *base, "--out", tmp_path / "a")
    assert code == 0 and "1 empty captions (embed)" in stdout, err
    s = EmbeddingStore(tmp_path / "a")
    assert s.keys("e") == ["k0", "k1", "k2"]
    np.testing.assert_allclose(s.get("e", 1), _expected(encoders, "raw", [""])[0], atol=2e-3)
    code, _, _ = _embed(capsys, *base, "--out", tmp_path / "b", "--on-empty", "skip")
    assert code == 0 and EmbeddingStore(tmp_path / "b").keys("e") == ["k0", "k2"]
    code, _, err = _embed(capsys, *base, "--out", tmp_path / "c", "--on-empty", "error")
    assert code == 2 and "'k1' has an empty caption" in one_line(err)


def test_corrupt_shard_is_reported_and_skipped(tmp_path, corpus, tiny_llm_dir, capsys):
    root, _ = corpus
    data = tmp_path / "shards"
    data.mkdir()
    for n in ("data-0000", "data-0001", "data-0002"):
        (data / f"{n}.tar").write_bytes((root / "shards" / f"{n}.tar").read_bytes())
    good = (data / "data-0001.tar").read_bytes()
    (data / "data-0001.tar").write_bytes(good[: len(good) // 2 + 7])
    out = tmp_path / "st"
    args = ["--data", data, "--llm", tiny_llm_dir, "--out", out]
    code, stdout, err = _embed(capsys, *args)
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if not PROGRESS.match(ln)]  # no terminal: status lines too
    assert len(lines) == 2, err  # reported when it happens, then the final error
    assert lines[0].startswith("flame embed: shard data-0001 failed: unreadable tar (truncated")
    assert lines[1].startswith("flame embed: error: 1 shard failed: data-0001") and "rerun" in lines[1]
    assert "shards 2 done / 0 skipped / 1 failed" in stdout
    assert EmbeddingStore(out).shards == ["data-0000", "data-0002"]
    before = store_files(out)
    assert "attempts/data-0001.json" in before  # the failure is recorded (a rerun tries it last)
    del before["attempts/data-0001.json"]
    (data / "data-0001.tar").write_bytes(good)  # fixed: the rerun does only that shard
    code, stdout, err = _embed(capsys, *args)
    assert code == 0 and "shards 1 done / 2 skipped / 0 failed" in stdout, err
    after = store_files(out)
    assert {k: v for k, v in after.items() if k in before} == before and len(after) == len(before) + 2


def test_bad_inputs_fail_with_one_line(tmp_path, corpus, tiny_llm_dir, capsys):
    root, _ = corpus
    base = ["--llm", tiny_llm_dir, "--out", tmp_path / "st"]
    cases = [
        (["--data", tmp_path / "nothing-{0..9}.tar"], "no shard files match"),
        (["--data", root / "shards", "--prompts", "long=recap:long"], "no caption table named 'recap'"),
        (["--data", root / "shards", "--captions", tmp_path / "nope.json"], "caption table not found"),
        (["--data", root / "shards", "--prompts", "huge=txt"], "unknown prompt set 'huge'"),
        (["--data", root / "shards", "--prompts", "raw"], "expected SET=SOURCE"),
        (["--data", root / "shards", "--prompts", "raw=txt", "raw=json"], "given twice"),
        (
            ["--data", root / "shards", "--captions", root / "recap.json", "--prompts", "long=recap:longer"],
            "no column 'longer'",
        ),
        (["--data", root / "shards", "--layer", "9"], "layer 9 is out of range"),
        (["--data", root / "shards", "--layer", "x"], "--layer: expected an integer"),
    ]
    for args, message in cases:
        code, _, err = _embed(capsys, *args, *base)
        assert code == 2, (args, err)
        line = one_line(err)
        assert line.startswith("flame embed: error: ") and message in line, (args, line)
    assert not (tmp_path / "st").exists()  # nothing left behind


def test_second_writer_is_refused_by_the_lock(tmp_path, corpus, tiny_llm_dir, capsys):
    root, _ = corpus
    out = tmp_path / "st"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another flame embed holds the store
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = _embed(capsys, "--data", root / "shards", "--llm", tiny_llm_dir, "--out", out)
        assert code == 2 and "being written by another flame embed" in one_line(err)
        assert not (out / "manifest.json").exists()
    code, _, err = _embed(capsys, "--data", root / "shards", "--llm", tiny_llm_dir, "--out", out)
    assert code == 0, err  # the lock dies with its holder


def test_dry_run_writes_nothing(tmp_path, corpus, tiny_llm_dir, capsys):
    root, _ = corpus
    bad = tmp_path / "shards"
    bad.mkdir()
    (bad / "x.tar").write_bytes(b"junk" * 300)
    code, stdout, err = _embed(
        capsys,
        "--data",
        root / "shards",
        bad / "x.tar",
        "--captions",
        root / "recap.json",
        "--prompts",
        *PROMPTS,
        "--llm",
        tiny_llm_dir,
        "--out",
        tmp_path / "st",
        "--dtype",
        "int8",
        "--dry-run",
    )
    assert code == 0, err
    assert "4 shards, 18 samples to store" in stdout and "1 unreadable shards" in stdout
    per_sample = 11 * 32 + 4 * 11
    assert f"({per_sample:,} bytes per sample)" in stdout
    assert "projected time on cpu" in stdout
    assert not (tmp_path / "st").exists()


def test_tar_member_names_with_folders(tmp_path, tiny_llm_dir, capsys):
    """img2dataset-style members may carry a folder prefix; the key keeps it, as webdataset's does."""
    path = tmp_path / "d" / "f.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tf:
        for name, data in [("sub/k1.jpg", FAKE_JPEG), ("sub/k1.txt", b"a dog"), ("sub/k2.txt", b"a cat")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io

            tf.addfile(info, io.BytesIO(data))
    code, _, err = _embed(capsys, "--data", path, "--llm", tiny_llm_dir, "--out", tmp_path / "st")
    assert code == 0, err
    assert EmbeddingStore(tmp_path / "st").keys("f") == ["sub/k1", "sub/k2"]
