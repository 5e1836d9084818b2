"""flame train --compile: the tower's training forward goes through torch.compile (inductor), trains
what the eager forward trains, writes checkpoints an eager run (and `FlameModel.load`) reads, and is
refused in one line where the compiler it needs is missing."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from support.commands import TORCHRUN_2, run_flame
from support.training import TINY, make_set, weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_set(tmp_path_factory.mktemp("compile"), shards=2, per=16)


def _train(capsys, root, out, *extra):
    return run_flame(capsys, "train", "--data", root / "shards", "--embeddings", root / "store", "--out", out, *TINY,
                     "--batch-size", "8", "--workers", "0", "--steps", "3", "--warmup", "0", "--log-every", "1",
                     "--no-tensorboard", "--no-progress", *extra)


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_refused_in_one_line_without_a_cpu_compiler(data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None)
    r = _train(capsys, data, tmp_path / "run", "--compile")
    assert r.code == 2 and "--compile: torch.compile on the CPU needs a C++ compiler" in r.error
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.slow
def test_compiled_run_trains_as_the_eager_run_and_its_checkpoints_load(data, tmp_path, capsys):
    from torch._dynamo.utils import counters

    from flame import FlameModel

    assert _train(capsys, data, tmp_path / "eager").code == 0
    counters.clear()
    assert _train(capsys, data, tmp_path / "compiled", "--compile", "--save-every", "2", "--keep", "0").code == 0
    assert counters["stats"]["unique_graphs"] >= 1  # the forward really went through dynamo

    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    for a, b in zip(compiled, eager):
        assert abs(a - b) <= 1e-4 * abs(b), (compiled, eager)
    we, wc = weights(tmp_path / "eager" / "checkpoint-3"), weights(tmp_path / "compiled" / "checkpoint-3")
    assert wc.keys() == we.keys()  # the plain model's names, not the compiled wrapper's
    for name, w in we.items():
        a, b = wc[name], w
        if name.endswith("attn.in_proj_bias"):  # the key third's gradient is 0 in exact arithmetic (softmax
            third = len(b) // 3                  # ignores a constant per query), rounding noise that Adam
            a, b = torch.cat([a[:third], a[2 * third:]]), torch.cat([b[:third], b[2 * third:]])  # scales up
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), name
    FlameModel.load(tmp_path / "compiled" / "checkpoint-3")
    # an eager resume of the compiled run's step 2 (--compile is not a setting a resume must match)
    # redoes step 3 from the compiled run's weights and state: the same loss
    assert _train(capsys, data, tmp_path / "compiled", "--resume", tmp_path / "compiled" / "checkpoint-2").code == 0
    redone = _losses(tmp_path / "compiled")
    assert len(redone) == 3 and abs(redone[2] - compiled[2]) <= 1e-4 * abs(compiled[2]), (redone, compiled)


@pytest.mark.slow
def test_two_processes_compiled_with_accumulation_log_the_eager_losses(data, tmp_path):
    """Under DDP (torchrun, gloo) with --accum 2, where dynamo splits the graph at DDP's buckets and
    the micro-steps go through the compiled wrapper's no_sync: the eager run's losses."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(out, *extra):
        cmd = [*TORCHRUN_2, "-m", "flame", "train", "--data", str(data / "shards"), "--embeddings",
               str(data / "store"), "--out", str(out), *TINY, "--batch-size", "4", "--accum", "2", "--workers", "0",
               "--steps", "3", "--warmup", "0", "--log-every", "1", "--device", "cpu", *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _losses(out)

    eager, compiled = torchrun(tmp_path / "eager"), torchrun(tmp_path / "compiled", "--compile")
    assert len(compiled) == len(eager) == 3
    for a, b in zip(compiled, eager):
        assert abs(a - b) <= 1e-4 * abs(b), (compiled, eager)
