"""Weighted data mixes (`--data SHARDS::WEIGHT`, the resampled stream) and `--train-num-samples`.

The sources of the shared set differ in shard size and count on purpose (a: 4 shards of 8, b: one
of 40, c: 2 of 5): a weight is a share of the samples drawn, so a stream that drew shards (rather
than samples) by weight, or sources in proportion to their size, would miss the shares here.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from support.commands import run_flame
from support.training import TINY, bag_of_words_store

from flame.data.images import StreamConfig, TrainStream, make_loader
from flame.data.mix import parse_source
from flame.errors import FlameError
from flame.train import TrainConfig, TrainState, plan, validate

SOURCES = {"a": (4, 8), "b": (1, 40), "c": (2, 5)}  # name -> (shards, samples per shard)


@pytest.fixture(scope="module")
def mixset(tmp_path_factory) -> Path:
    from flame.data.synthetic import write_shards

    root = tmp_path_factory.mktemp("mix")
    paths = []
    for seed, (name, (shards, per)) in enumerate(SOURCES.items()):
        paths += write_shards(root / name, shards * per, shard_size=per, size=24, seed=seed, prefix=name)
    bag_of_words_store(paths, root / "store", dim=8, k=3)
    return root


def config(root: Path, data: list[str], **kw) -> TrainConfig:
    return validate(TrainConfig(data=data, embeddings=str(root / "store"), out=str(root / "run"), tower="vit-tiny",
                                image_size=16, proj_hidden=16, device="cpu", **kw))


def stream_config(p, batch_size: int, **kw) -> StreamConfig:
    return StreamConfig(shards=[str(s) for s in p.shards], store=str(p.store.path), image_size=16,
                        batch_size=batch_size, m=p.m, eligible=p.eligible, seed=p.cfg.seed, sources=p.mix,
                        epoch_samples=p.samples, **kw)


def source_of(key: str) -> str:
    return key.split("-")[0]


@pytest.mark.parametrize("text, expect", [
    ("a/*.tar::", "no weight after '::'"), ("::3", "no shards before '::'"), ("a/*.tar::x", "positive number"),
    ("a/*.tar::0", "positive number"), ("a/*.tar::-2", "positive number"), ("a/*.tar::nan", "positive number"),
    ("a/*.tar::inf", "positive number"),
])
def test_a_bad_weight_is_one_error(text, expect):
    with pytest.raises(FlameError, match=expect):
        parse_source(text)


def test_weights_parse_and_a_path_without_one_is_unweighted():
    assert parse_source("cc12m/{00000..01242}.tar::3").weight == 3.0
    assert parse_source("cc12m/{00000..01242}.tar::3").spec == "cc12m/{00000..01242}.tar"
    assert parse_source("x/a-0.5.tar::0.25").weight == 0.25
    assert parse_source("cc3m/").weight is None


@pytest.mark.parametrize("weight", ["0", "-1", "x", ""])
def test_flame_train_with_a_bad_weight_is_one_line_exit_2(weight, mixset, tmp_path, capsys):
    r = run_flame(capsys, "train", "--data", f"{mixset / 'a'}::3", "--data", f"{mixset / 'b'}::{weight}",
                  "--embeddings", mixset / "store", "--out", tmp_path / "run", *TINY)
    assert r.code == 2
    assert "--data" in r.error and "WEIGHT" in r.error, r.error
    assert not (tmp_path / "run").exists()


def test_weights_without_the_resampled_stream_are_refused(mixset):
    with pytest.raises(FlameError, match="resampled"):
        plan(config(mixset, [f"{mixset / 'a'}::3", f"{mixset / 'b'}::1"], resampled=False))


def test_a_shard_in_two_sources_is_refused(mixset):
    with pytest.raises(FlameError, match="two --data sources"):
        plan(config(mixset, [f"{mixset / 'a'}::3", f"{mixset / 'a' / 'a-00000.tar'}::1"]))


def test_repeated_data_flags_add_sources(mixset, tmp_path, capsys):
    """`--data A::5 --data B::3 --data C::2` is three sources (a repeated list flag used to keep only the last)."""
    from flame.cli import build_parser, config_from_args

    args = build_parser("train").parse_args(["train", "--data", "a::5", "--data", "b::3", "c::2", "--embeddings",
                                             "s", "--out", "o"])
    assert config_from_args(TrainConfig, args).data == ["a::5", "b::3", "c::2"]


@pytest.mark.slow
def test_over_10000_drawn_samples_each_source_is_within_2_percent_of_its_weight(mixset, tmp_path):
    yaml = tmp_path / "mix.yaml"  # the same mix as a YAML list under --config
    yaml.write_text("data:\n" + "".join(f"  - '{mixset / n}/*.tar::{w}'\n" for n, w in (("a", 5), ("b", 3), ("c", 2))))
    from flame.config import build

    p = plan(build(TrainConfig, {"embeddings": str(mixset / "store"), "out": str(tmp_path / "run"),
                                 "tower": "vit-tiny", "image_size": 16, "device": "cpu"}, yaml))
    assert [s["weight"] for s in p.mix] == [5.0, 3.0, 2.0]
    drawn: Counter = Counter()
    shards: Counter = Counter()
    for batch in make_loader(stream_config(p, 500), workers=0):
        drawn.update(source_of(k) for k in batch["keys"])
        shards.update(k.split("/")[0] for k in batch["keys"])
        if sum(drawn.values()) >= 10_000:
            break
    total = sum(drawn.values())
    assert total == 10_000
    share = {n: drawn[n] / total for n in SOURCES}
    for name, weight in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(share[name] - weight) < 0.02, share
    # within a source its shards are drawn uniformly: c's two shards alike, a's four alike
    assert abs(shards["c-00000"] / drawn["c"] - 0.5) < 0.1, shards
    assert all(abs(shards[f"a-{i:05d}"] / drawn["a"] - 0.25) < 0.06 for i in range(4)), shards


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


@pytest.mark.parametrize("cut", [3, 8])
def test_a_resumed_resampled_stream_continues_the_same_sample_sequence(mixset, cut):
    """Two loader workers; after `cut` batches the run state is kept as a checkpoint keeps it
    (TrainState), and a new loader started from it yields what the uninterrupted one yields next:
    the same samples, crops and facets."""
    p = plan(config(mixset, [f"{mixset / 'a'}::5", f"{mixset / 'b'}::3", f"{mixset / 'c'}::2"], seed=3))
    n = 14
    whole = []
    for batch in make_loader(stream_config(p, 6), workers=2):
        whole.append(batch)
        if len(whole) == n:
            break
    state, first = TrainState(), []
    for batch in make_loader(stream_config(p, 6), workers=2):
        state.observe(batch["state"])
        first.append(batch)
        if len(first) == cut:
            break
    saved = TrainState()
    saved.load_state_dict({**state.state_dict(), "rng": TrainState().state_dict()["rng"]})
    rest = []
    resumed = stream_config(p, 6, positions={k: list(v) for k, v in saved.positions.items()}, rotate=saved.batches % 2)
    for batch in make_loader(resumed, workers=2):
        rest.append(batch)
        if cut + len(rest) == n:
            break
    assert keys_of(first + rest) == keys_of(whole)
    for a, b in zip(first + rest, whole):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["texts"], b["texts"])
    assert len(set(keys_of(whole))) < len(keys_of(whole))  # drawn with replacement: samples repeat


def test_train_num_samples_defines_the_epoch(mixset):
    mix = [f"{mixset / 'a'}::3", f"{mixset / 'b'}::1"]
    p = plan(config(mixset, mix, epochs=2.0, train_num_samples=1000, batch_size=8, accum=2))
    assert p.steps == math.ceil(2 * 1000 / (8 * 2))
    p = plan(config(mixset, mix, epochs=2.0, batch_size=8))  # default: the usable samples of the data (32 + 40)
    assert p.samples == 72 and p.steps == math.ceil(2 * 72 / 8)


def test_an_unweighted_run_keeps_the_epoch_stream_and_its_data_signature(mixset):
    p = plan(config(mixset, [str(mixset / "a"), str(mixset / "b")]))
    assert p.mix is None and "mix" not in p.data
    stream = TrainStream(stream_config(p, 4))
    batch = next(iter(stream))
    assert list(batch["state"]) == ["worker", "epoch", "pos", "missing", "undecodable", "samples"]


def test_resampled_without_weights_is_one_source_of_all_the_data(mixset):
    p = plan(config(mixset, [str(mixset / "a"), str(mixset / "c")], resampled=True))
    assert len(p.mix) == 1 and p.mix[0]["weight"] == 1.0
    assert [Path(s).name for s in p.mix[0]["shards"]] == [f"a-{i:05d}.tar" for i in range(4)] + [
        "c-00000.tar", "c-00001.tar"]
    assert p.data["mix"] != plan(config(mixset, [f"{mixset / 'a'}::1", f"{mixset / 'c'}::1"])).data["mix"]
