"""A small data set kept in memory across epochs (flame.data.memo): the batches must be
bit-identical to streaming from disk, and the tars and images must really not be read again."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
import webdataset as wds
from support.training import make_set

import flame.data.images as images
from flame.data.images import StreamConfig, TrainStream


def _batches(root, size: int, memo_bytes: int, n: int) -> list[dict]:
    shards = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    cfg = StreamConfig(shards=shards, store=str(root / "store"), image_size=size, batch_size=4, m=1, eligible=[0],
                       memo_bytes=memo_bytes)
    return list(islice(iter(TrainStream(cfg)), n))


@pytest.mark.parametrize("size", [32, 16])  # 40 px JPEGs: decoded in full at 32, at half size at 16
def test_kept_epochs_are_bit_identical_and_read_nothing_again(tmp_path, monkeypatch, size):
    root = make_set(tmp_path, shards=2, per=8)
    epochs = 4  # 16 samples, batch 4: 4 batches an epoch
    plain = _batches(root, size, 0, 4 * epochs)
    opened, decoded = [], []
    real_tar, real_decode = wds.tarfile_samples, images.decode_full
    monkeypatch.setattr(wds, "tarfile_samples", lambda urls, **kw: opened.append(urls) or real_tar(urls, **kw))
    monkeypatch.setattr(images, "decode_full", lambda *a, **kw: decoded.append(1) or real_decode(*a, **kw))
    kept = _batches(root, size, 256 << 20, 4 * epochs)
    for a, b in zip(plain, kept, strict=True):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["texts"], b["texts"])
    assert len(opened) == 2  # each shard read once, in the first epoch
    # full decodes are kept (one decode per image); half-size drafts are decoded every epoch, as before
    assert len(decoded) == (16 if size == 32 else 16 * epochs)


def test_a_data_set_over_the_budget_is_streamed_from_disk(tmp_path, monkeypatch):
    root = make_set(tmp_path, shards=2, per=8)
    opened = []
    real_tar = wds.tarfile_samples
    monkeypatch.setattr(wds, "tarfile_samples", lambda urls, **kw: opened.append(urls) or real_tar(urls, **kw))
    _batches(root, 32, 1000, 4 * 3)  # the tars alone are larger than 1,000 bytes
    assert len(opened) >= 2 * 3 - 1  # read again every epoch (the last one may not be finished)
