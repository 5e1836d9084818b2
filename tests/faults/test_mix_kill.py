"""A resampled (weighted) run killed with SIGKILL and resumed continues the same sample sequence
as an uninterrupted one: the same per-step losses in log.jsonl and bit-identical final weights.

The kill comes from flame.fileio's test hook (FLAME_TEST_KILL_AT, see test_train_kill.py for the
durable-step order): 18 is just after `latest` of checkpoint-4 was written, so the resume starts at step 4 with
each source in the middle of a shard (16- and 40-sample shards, batches of 8, two loader workers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.training import TINY, bag_of_words_store, weights

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from flame.data.synthetic import write_shards

    root = tmp_path_factory.mktemp("mixkill")
    paths = write_shards(root / "a", 48, shard_size=16, size=40, seed=0, prefix="a")
    paths += write_shards(root / "b", 40, shard_size=40, size=40, seed=1, prefix="b")
    bag_of_words_store(paths, root / "store", dim=16, k=3)
    return root


def cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flame", "train", "--data", f"{root / 'a'}/*.tar::3", "--data",
            f"{root / 'b'}/*.tar::1", "--embeddings", str(root / "store"), "--out", str(out), *TINY,
            "--batch-size", "8", "--workers", "2", "--steps", str(STEPS), "--save-every", "2", "--keep", "2",
            "--warmup", "2", "--log-every", "1", "--deterministic", "--seed", "5", *extra]


def env(**extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "FLAME_TEST_KILL_AT"}
    return dict(e, OMP_NUM_THREADS="1", **extra)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def test_killed_and_resumed_resampled_run_continues_the_same_sequence(data, tmp_path):
    ref = tmp_path / "reference"
    proc = subprocess.run(cmd(data, ref), env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as f:
        proc = subprocess.run(cmd(data, out), env=env(FLAME_TEST_KILL_AT="18"), stdout=f, stderr=f, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert (out / "latest").read_text().strip() == "checkpoint-4" and not (out / "checkpoint-6").exists()
    saved = torch.load(out / "checkpoint-4" / "state.pt", map_location="cpu", weights_only=True)
    assert all(len(v) > 2 for v in saved["positions"][0].values())  # the mix's counters are in the checkpoint
    proc = subprocess.run(cmd(data, out, "--resume"), env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "checkpoint-4" in proc.stderr, proc.stderr[-2000:]
    assert losses(out) == losses(ref)
    final, reference = weights(out / f"checkpoint-{STEPS}"), weights(ref / f"checkpoint-{STEPS}")
    assert [k for k in reference if not torch.equal(final[k], reference[k])] == []
