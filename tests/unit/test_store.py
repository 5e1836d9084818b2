"""The embedding store: layout, atomic writes, quantisation, manifest checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.arrays import store_manifest, unit_vectors

from flame.errors import FlameError
from flame.store import EmbeddingStore, manifest_difference, quantize_int8

K, D = 4, 16


def _manifest(dtype="fp16", layer=(2,), fingerprint="abc123", spec="tiny"):
    return store_manifest(K, D, dtype, layer, fingerprint, spec)


def _vectors(n, seed=0):
    return unit_vectors(n, K, D, seed)


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_roundtrip(tmp_path, dtype):
    s = EmbeddingStore.create(tmp_path / "st", _manifest(dtype))
    v = _vectors(10)
    keys = [f"k{i:03d}" for i in range(10)]
    nbytes = s.write_shard("shard-0001", keys, v)
    s.write_shard("shard-0000", keys[:3], v[:3])

    r = EmbeddingStore(tmp_path / "st")
    assert r.shards == ["shard-0000", "shard-0001"]
    assert len(r) == 13 and r.k == K and r.dim == D and r.dtype == dtype
    assert r.facet_names == [f"short/{i}" for i in range(K)]
    assert r.keys("shard-0001") == keys
    assert r.index("shard-0001")["k007"] == 7
    arr = r.array("shard-0001")
    assert isinstance(arr, np.memmap) and arr.shape == (10, K, D)
    assert arr.dtype == (np.float16 if dtype == "fp16" else np.int8)
    got = r.get("shard-0001", [7, 2, 9])
    assert got.dtype == np.float32 and got.shape == (3, K, D)
    tol = 1e-3 if dtype == "fp16" else 1e-2
    np.testing.assert_allclose(got, v[[7, 2, 9]], atol=tol)
    np.testing.assert_allclose(r.get("shard-0001", 4), v[4], atol=tol)
    # a facet subset (what training reads) gives exactly those facets of the full rows
    facets = [K - 1, 0]
    assert np.array_equal(r.get("shard-0001", 4, facets), r.get("shard-0001", 4)[facets])
    assert np.array_equal(r.get("shard-0001", [7, 2], facets), r.get("shard-0001", [7, 2])[:, facets])
    if dtype == "int8":
        assert r.scales("shard-0001").shape == (10, K)
        assert nbytes == sum(
            (tmp_path / "st" / "shards" / f"shard-0001{s}").stat().st_size for s in (".npy", ".scale", ".keys.json")
        )
    else:
        assert r.scales("shard-0001") is None
        assert not (tmp_path / "st" / "shards" / "shard-0001.scale").exists()
    # no temporary file left behind
    assert not list((tmp_path / "st").rglob("*.tmp"))


def test_int8_quantisation_accuracy():
    v = _vectors(200, seed=1).reshape(-1, D * 64 // 64)
    q, s = quantize_int8(v)
    assert q.dtype == np.int8 and s.shape == v.shape[:-1]
    assert np.abs(q).max() == 127
    back = q.astype(np.float32) * s[:, None]
    cos = (back * v).sum(-1) / np.linalg.norm(back, axis=-1) / np.linalg.norm(v, axis=-1)
    assert cos.min() > 0.999
    q0, s0 = quantize_int8(np.zeros((2, D), np.float32))
    assert not q0.any() and not s0.any()


def test_incomplete_shard_is_invisible_and_writes_are_deterministic(tmp_path):
    a = EmbeddingStore.create(tmp_path / "a", _manifest("int8"))
    b = EmbeddingStore.create(tmp_path / "b", _manifest("int8"))
    v = _vectors(5)
    keys = list("abcde")
    a.write_shard("s", keys, v)
    # a half-written shard of a killed run: array present, keys missing, stray temporaries
    w = b.shard_writer("s", 5)
    w.write(slice(0, 2), v[:2])
    del w
    (b.path / "shards" / "s.npy").write_bytes(b"junk")
    assert b.shards == [] and len(b) == 0
    assert b.clean_temporaries() == 2
    b.write_shard("s", keys, v)
    for name in ("manifest.json", "shards/s.npy", "shards/s.scale", "shards/s.keys.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name


def test_streaming_writer_with_copies_matches_write_shard(tmp_path):
    a = EmbeddingStore.create(tmp_path / "a", _manifest("int8"))
    b = EmbeddingStore.create(tmp_path / "b", _manifest("int8"))
    v = _vectors(6)
    v[4] = v[1]
    a.write_shard("s", list("abcdef"), v)
    w = b.shard_writer("s", 6)
    w.write(np.array([0, 1, 2]), v[:3, :2], facets=slice(0, 2))
    w.write(np.array([0, 1, 2]), v[:3, 2:], facets=slice(2, 4))
    w.write(np.array([3, 5]), v[[3, 5]])
    w.copy_rows(np.array([4]), np.array([1]))
    w.commit(list("abcdef"))
    for name in ("shards/s.npy", "shards/s.scale", "shards/s.keys.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name


def test_manifest_checks(tmp_path):
    path = tmp_path / "st"
    s = EmbeddingStore.create(path, _manifest())
    s.write_shard("x", ["k"], _vectors(1))
    before = (path / "manifest.json").read_bytes()
    # same weights under another spec string (e.g. relative vs absolute path): accepted, manifest untouched
    EmbeddingStore.create(path, _manifest(spec="/abs/tiny"))
    assert (path / "manifest.json").read_bytes() == before
    for other in (_manifest(layer=(3,)), _manifest(fingerprint="fff"), _manifest(dtype="int8")):
        with pytest.raises(FlameError, match="different settings.*--overwrite"):
            EmbeddingStore.create(path, other)
        assert EmbeddingStore(path).shards == ["x"]  # nothing lost
    s2 = EmbeddingStore.create(path, _manifest(layer=(3,)), overwrite=True)
    assert s2.shards == [] and s2.manifest["layer"] == [3]
    assert manifest_difference(_manifest(), _manifest(layer=(1,))).startswith("layer")


def test_not_a_store(tmp_path):
    with pytest.raises(FlameError, match="not an embedding store"):
        EmbeddingStore(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(FlameError, match="not a flame-embeddings manifest"):
        EmbeddingStore(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(FlameError, match="not an embedding store"):
        EmbeddingStore.create(other, _manifest(), overwrite=True)
    assert (other / "precious.txt").exists()
    s = EmbeddingStore.create(tmp_path / "new", _manifest())
    with pytest.raises(FlameError, match="no complete shard"):
        s.array("missing")
    with pytest.raises(ValueError):
        s.write_shard("bad", ["a"], np.zeros((1, K + 1, D), np.float32))
