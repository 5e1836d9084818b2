"""flame train killed (SIGKILL) at many points, and stopped by a full disk: every rerun with
--resume ends bit-identical to an uninterrupted run, and no checkpoint is ever visible under its
final name without all of its files.

Kill points come from flame.fileio's test hook (FLAME_TEST_KILL_AT=N: the process SIGKILLs itself at
its N-th durable step, just before or just after a rename) and from polling the run folder. For a
fresh run with --steps 8 --save-every 2 --keep 2 the durable steps are: 1-2 train-config.json; then
per checkpoint: config.json inside the temporary folder (2), the folder rename (2), the ledger
checkpoints.json (2), `latest` (2): 3-10 for checkpoint-2, 11-18 for checkpoint-4, 19-26 for
checkpoint-6, 27-28 the ledger again after pruning checkpoint-2. Each scenario checks that the
kill left the state it names, so a change in that order fails loudly here.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from support.training import FILES, TINY, make_set, weights

pytestmark = pytest.mark.slow

STEPS = 8


def cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flame", "train", "--data", str(root / "shards"), "--embeddings",
            str(root / "store"), "--out", str(out), *TINY, "--batch-size", "8", "--workers", "2", "--steps",
            str(STEPS), "--save-every", "2", "--keep", "2", "--warmup", "2", "--log-every", "1", "--deterministic",
            "--seed", "5", *extra]


def env(**extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "FLAME_TEST_KILL_AT"}
    return dict(e, OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_set(tmp_path_factory.mktemp("kill"), shards=2, per=32)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run(cmd(data, out), env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return weights(out / f"checkpoint-{STEPS}")


def visible_checkpoints_complete(out: Path) -> list[str]:
    """Every checkpoint under its final name has all its files, each readable (state as plain data);
    `latest`, when present, names one of them. Returns the checkpoint names."""
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    for name in names:
        ckpt = out / name
        assert all((ckpt / f).is_file() for f in FILES), f"partial checkpoint visible: {ckpt}"
        json.loads((ckpt / "config.json").read_text())
        assert weights(ckpt)
        torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    if (out / "latest").exists():
        assert (out / "latest").read_text().strip() in names
    return names


@contextmanager
def watched(out: Path):
    """For as long as the block runs (every run, killed or not), a thread polls the run folder and
    records any checkpoint seen under its final name without all of its files."""
    seen: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                names = os.listdir(out)
            except FileNotFoundError:
                names = []
            for name in names:
                ckpt = out / name
                missing = [f for f in FILES if not (ckpt / f).is_file()] if name.startswith("checkpoint-") else []
                if missing and ckpt.is_dir():  # (a folder renamed away meanwhile is not a finding)
                    seen.append(f"{name} without {missing}")
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
    assert not seen, f"partial checkpoints were visible: {seen[:3]}"


def temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".checkpoint-*"))


def kill_when(proc: subprocess.Popen, out: Path, ready, what: str, timeout: float = 240) -> None:
    """SIGKILL `proc` as soon as `ready()` holds, checking the visible checkpoints all along."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        visible_checkpoints_complete(out)
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def killed_run(args: list[str], at: int, log: Path, **kw) -> None:
    """Run until the FLAME_TEST_KILL_AT hook kills it. Output goes to a file: orphaned data-loader
    workers keep a pipe open for seconds after their parent died."""
    with open(log, "w") as f:
        proc = subprocess.run(args, env=env(FLAME_TEST_KILL_AT=str(at)), stdout=f, stderr=f, timeout=300, **kw)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]


def log_lines(out: Path) -> int:
    try:
        return len((out / "log.jsonl").read_text().splitlines())
    except OSError:
        return 0


def resume_and_compare(data: Path, out: Path, reference: dict, **kw) -> None:
    proc = subprocess.run(cmd(data, out, "--resume"), env=env(), capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert visible_checkpoints_complete(out)[-1] == f"checkpoint-{STEPS}"
    assert (out / "latest").read_text().strip() == f"checkpoint-{STEPS}"
    assert not temporaries(out)
    final = weights(out / f"checkpoint-{STEPS}")
    assert final.keys() == reference.keys()
    different = [k for k in final if not torch.equal(final[k], reference[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:3]}"
    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), steps


# name -> (FLAME_TEST_KILL_AT or None for a polled kill, check of what the kill left behind)
SCENARIOS = {
    "first steps, no checkpoint yet": (None, lambda out: not list(out.glob("checkpoint-*"))),
    "checkpoint-2 half written (weights, no state)": (
        4, lambda out: not list(out.glob("checkpoint-*")) and any(
            (out / t / "model.safetensors").exists() and not (out / t / "state.pt").exists()
            for t in temporaries(out))),
    "checkpoint-2 complete but not renamed": (
        5, lambda out: not list(out.glob("checkpoint-*")) and any(
            (out / t / "state.pt").exists() for t in temporaries(out))),
    "checkpoint-2 renamed, latest not written": (
        6, lambda out: (out / "checkpoint-2").is_dir() and not (out / "latest").exists()),
    "checkpoint-4 saved, latest still checkpoint-2": (
        16, lambda out: (out / "checkpoint-4").is_dir() and (out / "latest").read_text().strip() == "checkpoint-2"),
    "checkpoint-6 saved, checkpoint-2 pruned, ledger not yet rewritten": (
        27, lambda out: not (out / "checkpoint-2").exists() and (out / "latest").read_text().strip() == "checkpoint-6"
        and "checkpoint-2" in (out / "checkpoints.json").read_text()),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sigkill_then_resume_is_identical(name, data, reference, tmp_path):
    at, left = SCENARIOS[name]
    out = tmp_path / "run"
    with watched(out):
        if at is None:
            proc = subprocess.Popen(cmd(data, out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            kill_when(proc, out, lambda: log_lines(out) >= 1, "the first step")
        else:
            killed_run(cmd(data, out), at, tmp_path / "killed.log")
        visible_checkpoints_complete(out)
        assert left(out), f"the kill did not leave the state {name!r}: {sorted(p.name for p in out.iterdir())}"
        resume_and_compare(data, out, reference)


def test_sigkill_during_a_write_and_again_during_the_resume(data, reference, tmp_path):
    """A polled kill while a temporary checkpoint folder exists (really mid-write), then the resumed
    job is killed too, mid-way through its next checkpoint; the third run finishes."""
    out = tmp_path / "run"
    with watched(out):
        proc = subprocess.Popen(cmd(data, out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(proc, out, lambda: bool(temporaries(out)) or (out / "checkpoint-4").exists(), "a checkpoint write")
        visible_checkpoints_complete(out)
        # the resumed job: train-config + log rewrite (2 durable steps each), then its first checkpoint's
        # config.json (2): killed just before that checkpoint's rename
        killed_run(cmd(data, out, "--resume"), 7, tmp_path / "killed.log")
        visible_checkpoints_complete(out)
        resume_and_compare(data, out, reference)


def test_full_disk_during_a_checkpoint_is_one_error_and_a_rerun_completes(data, reference, tmp_path):
    out = tmp_path / "run"
    with watched(out):
        killed_run(cmd(data, out), 10, tmp_path / "killed.log")  # right after checkpoint-2 and `latest` were written
        before = weights(out / "checkpoint-2")

        def small_disk():  # no file may grow past 2 MB: model.safetensors (1.4 MB) fits, state.pt (2.9 MB) not
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

        proc = subprocess.run(cmd(data, out, "--resume"), env=env(), capture_output=True, text=True, timeout=300,
                              preexec_fn=small_disk)
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "checkpoint-4" in errors[0] and "File too large" in errors[0] and "--resume" in errors[0]
        assert visible_checkpoints_complete(out) == ["checkpoint-2"]
        assert (out / "latest").read_text().strip() == "checkpoint-2"
        assert not temporaries(out)
        after = weights(out / "checkpoint-2")
        assert all(torch.equal(before[k], after[k]) for k in before)
        resume_and_compare(data, out, reference)
