"""`flame search` at scale (issue 18, item 14), with a stand-in model and empty photo files (no
image decoded; the indexer, the store and the query run as they are): indexing writes bytes in
proportion to the photos, not to photos x commits; a query and a compaction hold one block of
vectors, never the index; a long path costs only its own bytes in the key index; a torn log line
(a killed append) loses nothing."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from support.search_data import FakeModel, empty_photos, fake_decoding, name_seed, vector

from flame.search import build_index, load_index, search

D = 1024


def _written() -> int:
    """Bytes this process has passed to write(2) so far (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def _bookkeeping(index: Path) -> int:
    """Bytes of everything in the index but the vector arrays."""
    return sum(p.stat().st_size for p in index.rglob("*")
               if p.is_file() and (not p.name.endswith(".npy") or p.parent.name == "stats"))


def _build(photos: Path, index: Path, dim: int, **kw):
    return build_index(photos, FakeModel(dim), index, batch_size=256, workers=0, progress=False, **kw)


def _peak(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_indexing_writes_bytes_linear_in_the_photos(tmp_path, monkeypatch):
    """40 commits of 64 photos: everything written is about what the index holds at the end (a
    rewrite of all entries at each commit would write ~20 times that)."""
    import flame.search.index

    fake_decoding(monkeypatch)
    monkeypatch.setattr(flame.search.index, "COMMIT_EVERY", 64)
    empty_photos(tmp_path / "photos", 64 * 40, width=60)
    before = _written()
    report = _build(tmp_path / "photos", tmp_path / "idx", 8)
    written = _written() - before
    assert report.encoded == 2560
    kept = _bookkeeping(tmp_path / "idx")
    shards = 2560 * 8 * 2  # the fp16 vectors, written through a memory map (not counted by wchar)
    assert kept < written < 2 * kept + shards, (written, kept)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """10,000 photos, D 1024: 20 MB of fp16 vectors, 41 MB as float32."""
    mp = pytest.MonkeyPatch()
    fake_decoding(mp)
    root = tmp_path_factory.mktemp("big")
    rels = empty_photos(root / "photos", 10_000, width=30)
    _build(root / "photos", root / "idx", D)
    yield root, rels
    mp.undo()


@pytest.mark.slow
def test_a_query_holds_one_block_not_the_index(big):
    root, rels = big
    model = FakeModel(D)
    (prompts, hits, n, _), peak = _peak(lambda: search(model, root / "idx", "a red kite", k=5))
    assert n == 10_000 and len(hits) == 5
    # the same top 5, brute force from the definition of the fake vectors
    q = model.encode_text(["a red kite"])[0].numpy()
    scores = np.array([vector(name_seed(Path(r)), D) @ q for r in rels])
    best = np.argsort(-scores)[:5]
    assert [h[1] for h in hits] == [rels[i] for i in best]
    np.testing.assert_allclose([h[0] for h in hits], scores[best], atol=2e-3)
    all_vectors = 10_000 * D * 4
    assert peak < all_vectors / 2, peak  # one block of 2,048 rows (8 MB), not 41 MB


@pytest.mark.slow
def test_compaction_streams_the_live_vectors(big, tmp_path):
    import shutil

    root, rels = big
    photos, index = tmp_path / "photos", tmp_path / "idx"
    shutil.copytree(root / "photos", photos)
    shutil.copytree(root / "idx", index)
    gone = [rel for i, rel in enumerate(rels) if i % 3]  # 2 of 3 deleted, from every shard
    for rel in gone:
        (photos / rel).unlink()
    mp = pytest.MonkeyPatch()
    fake_decoding(mp)
    try:
        report, peak = _peak(lambda: _build(photos, index, D))
    finally:
        mp.undo()
    assert report.removed == len(gone) and report.encoded == 0
    live = rels[::3]
    live_vectors = len(live) * D * 4
    assert peak < live_vectors, peak  # blocks of 512 rows (2 MB) and the run's bookkeeping, not 14 MB + fp16
    stored = sum(np.load(p, mmap_mode="r").shape[0] for p in (index / "shards").glob("*.npy"))
    assert stored == len(live)  # compacted
    kept, vecs, _ = load_index(index)
    assert kept == sorted(live)
    want = np.stack([vector(name_seed(Path(r)), D) for r in kept])
    np.testing.assert_allclose(vecs, want, atol=2e-3)


def test_one_long_path_costs_only_its_own_bytes():
    from flame.store import KeyIndex

    keys = [f"{i:06d}.jpg" for i in range(5000)] + ["x" * 4000 + ".jpg"]
    index = KeyIndex(keys)
    assert index.nbytes < sum(len(k) for k in keys) + 16 * len(keys)  # fixed width: 5001 x 4004 bytes
    assert all(index[k] == i for i, k in enumerate(keys))
    assert index.get("nope.jpg") is None and "x" * 4000 + ".jpg" in index


def test_a_torn_log_line_is_ignored_then_cut(tmp_path, monkeypatch):
    """A run killed in the middle of appending its commit line: what was committed before is
    read as it was, and the next run starts the log on a clean line."""
    from flame.search import LOG, index_entries

    fake_decoding(monkeypatch)
    empty_photos(tmp_path / "photos", 10)
    _build(tmp_path / "photos", tmp_path / "idx", 8)
    entries = index_entries(tmp_path / "idx")
    log = tmp_path / "idx" / LOG
    with open(log, "ab") as f:
        f.write(b'{"add":"batch-000009","dr')
    assert index_entries(tmp_path / "idx") == entries
    empty_photos(tmp_path / "photos", 12)
    report = _build(tmp_path / "photos", tmp_path / "idx", 8)
    assert (report.encoded, report.reused) == (2, 10)
    assert log.read_bytes().endswith(b"\n") and b'"dr{' not in log.read_bytes()
    assert len(index_entries(tmp_path / "idx")) == 12
