"""`flame embed` killed (SIGKILL) at many points and out of disk space: after every kill no file
under its final name differs from an uninterrupted run's, and the rerun ends byte-identical;
a write limit hit while writing a shard gives one error line, keeps the earlier shards, and
a rerun with space completes identically."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from support.embed_data import FAKE_JPEG, caption, flame, make_shards, store_files

from flame.cli import main
from flame.store import EmbeddingStore

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1"}  # the same arithmetic in every process (and in-process, see _resume)
# FLAME_TEST_KILL_AT=N: the process kills itself at its N-th durable step (flame.fileio). An int8
# store of 4 shards: manifest 1-2, then per shard i (from 3 + 8 i): attempt record (+0, +1),
# array rename (+2 before, +3 after), scale (+4, +5), keys (+6, +7).
KILL_STEPS = {
    1: "manifest written, not yet renamed",
    4: "first shard marked as attempted",
    6: "first shard's array renamed, scales and keys not",
    8: "first shard's scales renamed, keys not",
    9: "first shard's keys written, not yet renamed",
    18: "second shard complete, its attempt record not yet removed",
}


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_llm_dir):
    root = tmp_path_factory.mktemp("killjob")
    make_shards(root / "shards", n_shards=4, per_shard=5, seed=11)
    args = ["--data", root / "shards", "--llm", tiny_llm_dir, "--dtype", "int8", "--chunk", "2"]
    ref = root / "reference"
    r = flame("embed", *args, "--out", ref, env=ENV)
    assert r.returncode == 0, r.stderr
    return args, store_files(ref)


def _resume(args, out) -> None:
    """The rerun, in this process with one torch thread (as the subprocesses): much cheaper
    than another interpreter, and it must give the same bytes as the subprocess reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["embed", *map(str, args), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)


def _no_partial_file_under_a_final_name(out: Path, ref: dict[str, bytes]) -> int:
    """Every file with its final name equals the uninterrupted run's file; returns how many."""
    n = 0
    for rel, data in store_files(out).items():
        if rel.endswith(".tmp"):
            continue
        if rel.startswith("attempts/"):
            record = json.loads(data)
            assert record["attempts"] >= 1 and record["error"] is None, rel
            continue
        assert rel in ref and data == ref[rel], f"{rel} differs from the uninterrupted run's"
        n += 1
    if (out / "manifest.json").exists():
        EmbeddingStore(out).validate()
    return n


@pytest.mark.parametrize("step", sorted(KILL_STEPS))
def test_sigkill_at_a_durable_step_then_rerun_is_identical(tmp_path, job, step):
    args, ref = job
    out = tmp_path / "st"
    r = flame("embed", *args, "--out", out, env={**ENV, "FLAME_TEST_KILL_AT": str(step)})
    assert r.returncode == -signal.SIGKILL, f"not killed at step {step} ({KILL_STEPS[step]}): {r.stderr[-500:]}"
    _no_partial_file_under_a_final_name(out, ref)
    _resume(args, out)
    assert store_files(out) == ref


def test_sigkill_while_a_shard_is_being_written_then_rerun_is_identical(tmp_path, job):
    args, ref = job
    out = tmp_path / "st"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **ENV}
    env["FLAME_TEST_SLOW_BATCH"] = "0.3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flame", "embed", *map(str, args), "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    tmp = out / "shards" / "data-0002.npy.tmp"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not tmp.exists():
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.15)  # inside the shard: some chunks written, the rest not
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert tmp.exists() and not (out / "shards" / "data-0002.keys.json").exists()
    assert _no_partial_file_under_a_final_name(out, ref) >= 7  # manifest + 2 complete int8 shards
    _resume(args, out)
    assert store_files(out) == ref


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_write_limit_hit_while_writing_a_shard(tmp_path, tiny_llm_dir):
    data = tmp_path / "data"
    data.mkdir()
    sizes = {"a": 2, "b": 60, "c": 2}  # b's array (~4 KB) is over the 2 KB limit, a's and c's are not
    import random

    rng = random.Random(0)
    for name, n in sizes.items():
        with wds.TarWriter(str(data / f"{name}.tar")) as w:
            for i in range(n):
                w.write({"__key__": f"{name}{i:04d}", "jpg": FAKE_JPEG, "txt": caption(rng)})
    args = ["--data", data, "--llm", tiny_llm_dir]
    ref = tmp_path / "ref"
    _resume(args, ref)  # the uninterrupted run
    out = tmp_path / "st"
    r = flame("embed", *args, "--out", out, env=ENV, preexec_fn=_limit_file_size(2048))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("flame embed: error: file too large while writing shard b;"), lines[0]
    assert "complete shards are kept" in lines[0]
    store = EmbeddingStore(out)
    assert store.shards == ["a"] and store.get("a", [0, 1]).shape == (2, 1, 32)
    assert store_files(out)["shards/a.npy"] == (ref / "shards" / "a.npy").read_bytes()
    assert not list(out.rglob("*.tmp"))
    _resume(args, out)  # space again
    assert EmbeddingStore(out).shards == ["a", "b", "c"]
    assert store_files(out) == store_files(ref)
