"""`flame embed` keeping the model busy (issue 15, item 11): the token budget binds on a GPU (not
--max-batch), captions are tokenized in one batch call, the host builds no [T, T] mask, the host
work runs on a bounded prefetch thread whose errors surface where they belong, and the store a run
writes is bit-identical with and without it."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from support.embed_data import make_shards, store_files

from flame.cli import main
from flame.embed.config import Config
from flame.embed.prefetch import prefetched
from flame.facets import FacetEncoder, _Item, default_max_batch
from flame.llm import load_llm, straight_to
from flame.prompts import clean_caption

CAPTIONS = ["", "dog", "a small red car " * 40, "a small red car " * 400, "<|im_end|> <s> café 東京",
            "He said \"look\"", "dog"]


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir):
    return load_llm(str(tiny_llm_dir))


def test_on_a_gpu_the_token_budget_binds_not_max_batch(tiny):
    assert Config(data=["x"], out="y").max_batch is None
    assert FacetEncoder(*tiny, prompts="raw").max_batch == 64  # the CPU: as before
    budget = 65536
    enc = FacetEncoder(*tiny, prompts="raw", batch_tokens=budget, max_batch=default_max_batch(budget, on_gpu=True))
    items = [_Item(list(range(30)), [[1, 2]]) for _ in range(5000)]  # raw-set sequences of 32 tokens
    sizes = [len(b) for b in enc._batches(items)]
    assert sizes[0] == budget // 32  # 2048 rows: the budget, not 64, cuts the batch
    assert default_max_batch(4096, on_gpu=False) == 64


def test_captions_are_tokenized_in_one_batch_call_with_the_same_ids(tiny):
    model, tok = tiny
    enc = FacetEncoder(model, tok, prompts="long", max_caption_tokens=64)
    caps = [clean_caption(c) for c in CAPTIONS]
    one_by_one = [enc._prefix(c) for c in caps]
    calls = []
    real = enc.tokenizer.__class__.__call__

    def counting(self, text, *a, **kw):
        calls.append(text)
        return real(self, text, *a, **kw)

    enc.tokenizer.__class__.__call__ = counting
    try:
        batched = enc._prefixes(caps)
    finally:
        enc.tokenizer.__class__.__call__ = real
    assert batched == one_by_one
    assert isinstance(calls[0], list) and len(calls[0]) == len(caps)
    assert all("red car" in c for c in calls[1:])  # one batch call; only the over-long ones are cut one by one


def test_the_host_builds_no_t_by_t_mask(tiny):
    enc = FacetEncoder(*tiny, prompts="long")
    items, _ = enc._items([clean_caption(c) for c in CAPTIONS[:3]], packed=True)
    host = enc._host_tensors(items)
    assert all(t.ndim == 2 for t in host)  # ids, positions, group: [B, T], last: [B, K]; the mask is the device's
    ids, mask, pos, last = enc._tensors(items)
    assert mask.shape == (len(items), 1, ids.shape[1], ids.shape[1])


def test_prepare_then_run_is_encode(tiny):
    enc = FacetEncoder(*tiny, prompts="short")
    assert torch.equal(enc.run(enc.prepare(CAPTIONS)), enc.encode(CAPTIONS))


def test_the_prefetch_thread_gives_the_same_items_and_raises_an_error_where_it_happened():
    def items():
        yield from range(5)
        raise ValueError("shard 7: bad tar header")

    got = []
    with pytest.raises(ValueError, match="^shard 7: bad tar header$"), prefetched(items()) as it:
        for x in it:
            got.append(x)
    assert got == [0, 1, 2, 3, 4]  # every item made before the error arrives first


def test_the_prefetch_thread_is_bounded_and_stops_when_the_loop_is_left():
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    before = threading.active_count()
    with pytest.raises(KeyboardInterrupt), prefetched(items(), depth=2) as it:
        for x in it:
            time.sleep(0.05)
            if x == 3:
                raise KeyboardInterrupt  # Ctrl-C in the model's loop
    assert len(made) <= 3 + 2 + 2  # consumed + queue depth + the one in hand
    assert threading.active_count() == before  # joined
    assert not any(t.name == "flame-embed-prefetch" for t in threading.enumerate())


def test_the_store_is_bit_identical_with_and_without_the_prefetch_thread(tmp_path, tiny_llm_dir):
    make_shards(tmp_path / "shards", n_shards=2, per_shard=7, seed=3)
    args = ["embed", "--data", str(tmp_path / "shards"), "--llm", str(tiny_llm_dir), "--chunk", "3"]
    assert main([*args, "--out", str(tmp_path / "on")]) == 0
    assert main([*args, "--no-prefetch", "--out", str(tmp_path / "off")]) == 0
    assert store_files(tmp_path / "on") == store_files(tmp_path / "off")


def test_an_error_while_preparing_a_chunk_fails_its_shard_in_one_line_and_the_rest_go_on(
        tmp_path, tiny_llm_dir, monkeypatch, capsys):
    shards = make_shards(tmp_path / "shards", n_shards=3, per_shard=4, seed=5)
    bad = sorted(shards)[1]
    poison = shards[bad][0][1]  # that shard's first caption
    real = FacetEncoder.prepare

    def prepare(self, captions, packed=True):
        if any(c == clean_caption(poison) for c in map(clean_caption, captions)):
            raise RuntimeError("tokenizer exploded\nsecond line")
        return real(self, captions, packed)

    monkeypatch.setattr(FacetEncoder, "prepare", prepare)
    code = main(["embed", "--data", str(tmp_path / "shards"), "--llm", str(tiny_llm_dir), "--out",
                 str(tmp_path / "store")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"shard {bad} failed: RuntimeError: tokenizer exploded (skipped; the other shards go on)" in err
    from flame.store import EmbeddingStore

    store = EmbeddingStore(tmp_path / "store")
    assert [n for n in sorted(shards) if store.is_complete(n)] == [n for n in sorted(shards) if n != bad]


def test_the_llm_is_loaded_straight_onto_its_gpu():
    assert straight_to(torch.device("cpu")) == {}
    kwargs = straight_to(torch.device("cuda:3"))
    assert kwargs["device_map"] == {"": "cuda:3"}
