"""More data workers (ranks x --workers) than shards (576 CC3M shards on 64 GPUs x 12 workers):
each shard must be read only by the workers that share it, not by every worker (issue 15.6),
and one epoch must still deliver every sample exactly once."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest
import webdataset as wds
from support.training import make_set

from flame.data.images import StreamConfig, TrainStream, worker_shards


@pytest.mark.parametrize("shards, workers", [(2, 4), (3, 4), (3, 8), (4, 4), (5, 2)])
def test_each_sample_once_per_epoch_and_no_shard_read_by_every_worker(shards, workers):
    items = [f"s{i}" for i in range(shards)]
    reads, kept = Counter(), Counter()
    for g in range(workers):
        mine, part, parts = worker_shards(items, g, workers)
        reads.update(mine)
        for shard in mine:
            for i in range(12):  # the samples of one shard, by position
                kept[(shard, i)] += i % parts == part
    assert set(kept.values()) == {1} and len(kept) == shards * 12  # every sample once
    assert max(reads.values()) == max(1, -(-workers // shards))  # each shard read by its ~G/S workers only


def test_the_stream_opens_only_its_own_shard_when_ranks_outnumber_shards(tmp_path, monkeypatch):
    root = make_set(tmp_path, shards=2, per=8)
    opened: list[list[str]] = []
    real = wds.tarfile_samples

    def spy(urls, **kw):
        urls = list(urls)
        opened.append([u["url"] for u in urls])
        return real(urls, **kw)

    monkeypatch.setattr(wds, "tarfile_samples", spy)
    shards = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    keys = Counter()
    for rank in range(4):  # 4 ranks of 0 loader workers: 4 data workers over 2 shards
        opened.clear()
        cfg = StreamConfig(shards=shards, store=str(root / "store"), image_size=16, batch_size=2, m=1,
                           eligible=[0], rank=rank, world=4)
        for batch in islice(iter(TrainStream(cfg)), 2):  # one epoch of this rank: 4 of 16 samples
            keys.update(batch["keys"])
        assert len(opened[0]) == 1, f"rank {rank} read {len(opened[0])} shards for its quarter of the data"
    assert len(keys) == 16 and set(keys.values()) == {1}
