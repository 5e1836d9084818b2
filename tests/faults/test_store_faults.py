"""The store under faults: every file fsynced before its rename, non-finite vectors refused,
damaged shards named in one clear error, bounded open files and a compact key index, and
the int8 scale file of one shard never colliding with another shard's array."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from support.arrays import store_manifest, unit_vectors

from flame.errors import FlameError
from flame.store import EmbeddingStore

K, D = 3, 8


def _manifest(dtype="fp16"):
    return store_manifest(K, D, dtype, fingerprint="abc")


def _vectors(n, seed=0):
    return unit_vectors(n, K, D, seed)


def _keys(n, prefix="k"):
    return [f"{prefix}{i:05d}" for i in range(n)]


# ---- durability -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_every_file_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch, dtype):
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store = EmbeddingStore.create(tmp_path / "st", _manifest(dtype))
    store.write_shard("a", _keys(5), _vectors(5))
    writer = store.shard_writer("b", 4)
    writer.write(np.arange(4), _vectors(4, seed=1))
    writer.commit(_keys(4))
    monkeypatch.undo()

    renames = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "replace"]
    finals = {str(p.resolve()) for p in (tmp_path / "st").rglob("*") if p.is_file()}
    # every file of the store got its final name by a rename: none was written in place
    assert finals == {dst for _, _, dst in renames}
    assert len(renames) == 1 + 2 * (2 if dtype == "fp16" else 3)  # manifest + two shards
    for i, src, dst in renames:
        synced = [j for j, e in enumerate(events[:i]) if e == ("fsync", src)]
        assert synced, f"{Path(dst).name} renamed into place without an fsync of its data"
        # nothing else happened to the file between its fsync and its rename
        assert not any(e[0] == "replace" and src in e[1:] for e in events[synced[-1] + 1 : i])
        parent = str(Path(dst).parent)
        nxt = next((j for j, *_ in renames if j > i), len(events))
        assert ("fsync", parent) in events[i + 1 : nxt + 1], f"folder not fsynced after renaming {Path(dst).name}"


def test_folder_replace_fsyncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    """What checkpoints and the GGUF cache use: a finished temporary folder moved into place."""
    from flame import fileio

    tmp = tmp_path / "out.tmp"
    (tmp / "sub").mkdir(parents=True)
    for rel in ("a.bin", "sub/b.json"):
        (tmp / rel).write_bytes(b"x" * 10)
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    fileio.replace(tmp, tmp_path / "out")
    monkeypatch.undo()
    i = events.index(("replace", str(tmp), str(tmp_path / "out")))
    synced = {e[1] for e in events[:i]}
    assert {str(tmp / "a.bin"), str(tmp / "sub" / "b.json"), str(tmp / "sub"), str(tmp)} <= synced
    assert events[i + 1:] == [("fsync", str(tmp_path))]
    assert (tmp_path / "out" / "sub" / "b.json").read_bytes() == b"x" * 10


# ---- non-finite vectors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, poison", [("fp16", "nan"), ("fp16", "inf"), ("fp16", "fp16-overflow"), ("int8", "nan"), ("int8", "inf")]
)
def test_non_finite_vectors_are_never_committed(tmp_path, dtype, poison):
    store = EmbeddingStore.create(tmp_path / "st", _manifest(dtype))
    v = _vectors(6)
    # fp16-overflow: finite in float32, inf once stored as float16 (what an LLM pass in fp16 can produce)
    v[[1, 4], 1, 2] = {"nan": np.nan, "inf": -np.inf, "fp16-overflow": 1e6}[poison]
    with pytest.raises(FlameError, match=r"2 of 6 samples have non-finite vectors.*'k00001', 'k00004'"):
        store.write_shard("s", _keys(6), v)
    assert store.shards == [] and not list((tmp_path / "st").rglob("*.tmp"))
    store.write_shard("s", _keys(6), _vectors(6))  # the same shard with finite vectors goes in
    assert store.shards == ["s"]


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_non_finite_data_on_disk_is_never_handed_out(tmp_path, dtype):
    store = EmbeddingStore.create(tmp_path / "st", _manifest(dtype))
    store.write_shard("s", _keys(4), _vectors(4))
    name = "s.npy" if dtype == "fp16" else "s.scale"
    path = tmp_path / "st" / "shards" / name
    arr = np.load(path, mmap_mode="r+")
    arr[2, 0, ...] = np.nan  # bit rot / a bad writer
    arr.flush()
    del arr
    r = EmbeddingStore(tmp_path / "st")
    np.testing.assert_allclose(r.get("s", [0, 1]), _vectors(4)[:2], atol=1e-2)
    with pytest.raises(FlameError, match=r"shard 's' is damaged \(1 of the vectors read hold NaN/inf\)"):
        r.get("s", [1, 2])


# ---- validation on open -----------------------------------------------------------------------
def _damage(store_path: Path, how: str) -> str:
    shards = store_path / "shards"
    if how == "manifest-D":
        m = json.loads((store_path / "manifest.json").read_text())
        m["dim"] = D * 2
        (store_path / "manifest.json").write_text(json.dumps(m))
        return r"s\.npy has shape \[5, 3, 8\], the manifest and keys say \[5, 3, 16\]: D 8 vs 16"
    if how == "manifest-K":
        m = json.loads((store_path / "manifest.json").read_text())
        m["k"] = K + 1
        (store_path / "manifest.json").write_text(json.dumps(m))
        return r"s\.npy has shape \[5, 3, 8\], the manifest and keys say \[5, 4, 8\]: K 3 vs 4"
    if how == "manifest-dtype":
        m = json.loads((store_path / "manifest.json").read_text())
        m["dtype"] = "int8"
        (store_path / "manifest.json").write_text(json.dumps(m))
        return r"s\.npy holds float16, the manifest says int8"
    if how == "truncated":
        data = (shards / "s.npy").read_bytes()
        (shards / "s.npy").write_bytes(data[: len(data) - 100])
        return r"s\.npy is truncated: 268 bytes, expected 368"
    if how == "keys":
        (shards / "s.keys.json").write_text(json.dumps(_keys(4)))
        return r"shape \[5, 3, 8\], the manifest and keys say \[4, 3, 8\]: N \(keys\) 5 vs 4"
    if how == "garbage":
        (shards / "s.npy").write_bytes(b"\0" * 368)
        return r"s\.npy is not a valid \.npy file"
    if how == "zero-length":
        (shards / "s.npy").write_bytes(b"")
        return r"s\.npy is not a valid \.npy file"
    raise ValueError(how)


@pytest.mark.parametrize(
    "how", ["manifest-D", "manifest-K", "manifest-dtype", "truncated", "keys", "garbage", "zero-length"]
)
def test_damaged_shard_gives_one_clear_error_naming_it(tmp_path, how):
    store = EmbeddingStore.create(tmp_path / "st", _manifest())
    store.write_shard("s", _keys(5), _vectors(5))
    store.write_shard("t", _keys(2), _vectors(2))
    pattern = _damage(tmp_path / "st", how)
    r = EmbeddingStore(tmp_path / "st")
    for read in (lambda: r.get("s", [0]), lambda: r.index("s"), lambda: r.array("s"), r.validate):
        with pytest.raises(FlameError, match=pattern) as info:
            read()
        msg = str(info.value)
        assert "\n" not in msg and "shard 's' is damaged" in msg and "rerun flame embed" in msg
    if how.startswith("manifest"):
        return
    assert r.get("t", [1]).shape == (1, K, D)  # the other shards stay readable


# ---- int8 naming ------------------------------------------------------------------------------
def test_int8_shards_named_x_and_x_scale_do_not_collide(tmp_path):
    store = EmbeddingStore.create(tmp_path / "st", _manifest("int8"))
    vx, vs = _vectors(5, seed=1), _vectors(7, seed=2)
    store.write_shard("x", _keys(5), vx)
    store.write_shard("x.scale", _keys(7, "y"), vs)
    r = EmbeddingStore(tmp_path / "st")
    assert r.shards == ["x", "x.scale"]
    r.validate()
    np.testing.assert_allclose(r.get("x", np.arange(5)), vx, atol=1e-2)
    np.testing.assert_allclose(r.get("x.scale", np.arange(7)), vs, atol=1e-2)


def test_int8_store_written_before_the_rename_still_reads(tmp_path):
    store = EmbeddingStore.create(tmp_path / "st", _manifest("int8"))
    v = _vectors(5)
    store.write_shard("x", _keys(5), v)
    shards = tmp_path / "st" / "shards"
    (shards / "x.scale").rename(shards / "x.scale.npy")  # the old layout
    np.testing.assert_allclose(EmbeddingStore(tmp_path / "st").get("x", np.arange(5)), v, atol=1e-2)


# ---- bounded resources ------------------------------------------------------------------------
def test_more_shards_than_the_file_descriptor_limit(tmp_path, monkeypatch):
    """200 int8 shards (two memory maps each) read under RLIMIT_NOFILE=64, twice over."""
    store = EmbeddingStore.create(tmp_path / "st", _manifest("int8"))
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is tested above; this is about reading
    for i in range(200):
        store.write_shard(f"s{i:03d}", _keys(3, f"s{i}-"), _vectors(3, seed=i))
    monkeypatch.undo()
    script = textwrap.dedent(
        f"""
        import resource
        import numpy as np
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        from flame.store import EmbeddingStore
        s = EmbeddingStore({str(tmp_path / "st")!r})
        assert len(s.shards) == 200 and len(s) == 600
        for _ in range(2):
            for i, name in enumerate(s.shards):
                row = s.index(name).get(f"s{{i}}-00002")
                assert row == 2, (name, row)
                assert s.get(name, [row]).shape == (1, {K}, {D})
        print("read", len(s.shards), "shards")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "read 200 shards" in r.stdout


def test_key_index_is_compact_and_correct(tmp_path):
    store = EmbeddingStore.create(tmp_path / "st", _manifest())
    n = 20_000
    keys = [f"{i:09d}" for i in np.random.default_rng(0).permutation(n)]
    store.write_shard("s", keys, np.broadcast_to(_vectors(1), (n, K, D)))
    r = EmbeddingStore(tmp_path / "st")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = r.index("s")
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert kept / n < 40, f"{kept / n:.0f} bytes per key kept by the index"
    assert all(index.get(k) == i for i, k in enumerate(keys[:500]))
    assert index.get("nope") is None and "nope" not in index and keys[7] in index and index[keys[7]] == 7
    assert index.get(keys[3][:-1]) is None and index.get(keys[3] + "0") is None


def test_open_shards_are_bounded(tmp_path):
    store = EmbeddingStore.create(tmp_path / "st", _manifest())
    for i in range(10):
        store.write_shard(f"s{i}", _keys(2), _vectors(2))
    r = EmbeddingStore(tmp_path / "st", max_open=3)
    for name in r.shards:
        r.get(name, [1])
    assert len(r._open) == 3 and list(r._open) == ["s7", "s8", "s9"]
