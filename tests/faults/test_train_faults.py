"""flame train under faults and hostile input (issue 10): pickled code in a checkpoint, resumes from
older checkpoints, NaN rows in the store, an error on one torchrun rank, two jobs on one folder, torn
logs, data that changed under a resume, bad settings, a full disk. The SIGKILL suite is in
test_train_kill.py."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support.commands import TORCHRUN_2
from support.training import FILES, TINY, make_set, weights

from flame.cli import main as flame_main
from flame.fileio import is_temporary_of

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_set(tmp_path_factory.mktemp("faults"))


def argv(root: Path, out: Path, *extra: str, shards: str | None = None) -> list[str]:
    return ["train", "--data", shards or str(root / "shards"), "--embeddings", str(root / "store"), "--out", str(out),
            *TINY, "--batch-size", "8", "--workers", "0", "--warmup", "1", "--deterministic", *extra]


def run(args: list[str], capsys) -> tuple[int, str]:
    code = flame_main(args)
    return code, capsys.readouterr().err.strip()


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_complete(ckpt: Path) -> None:
    """A checkpoint under its final name has every file and each one loads (safely)."""
    for name in FILES:
        assert (ckpt / name).is_file(), f"{ckpt} lacks {name}"
    json.loads((ckpt / "config.json").read_text())
    assert weights(ckpt)
    torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))


def latest(run_dir: Path) -> Path:
    ckpt = run_dir / (run_dir / "latest").read_text().strip()
    assert_complete(ckpt)
    return ckpt


# ---------------------------------------------------------------------------------------
# 1. security: state.pt is plain data, a pickle that runs code is refused
# ---------------------------------------------------------------------------------------
class CreatesFile:
    """Unpickling this opens (creates) a file: a stand-in for any code a pickle can run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_state_file_that_runs_code(data, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(argv(data, out, "--steps", "2", "--save-every", "1"), capsys)
    assert code == 0, err
    # the state written by training loads without unpickling arbitrary objects
    state = torch.load(out / "checkpoint-2" / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["state"]

    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": CreatesFile(str(marker))}, out / "checkpoint-1" / "state.pt")
    code, err = run(argv(data, out, "--steps", "2", "--save-every", "1", "--resume", str(out / "checkpoint-1")),
                    capsys)
    assert code == 2
    line = one_line(err)
    assert "state.pt" in line and "refus" in line
    assert not marker.exists(), "the pickle ran"


# ---------------------------------------------------------------------------------------
# 2. resuming from an older checkpoint keeps the new checkpoints; files are fsynced
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep,expect", [(1, [5]), (2, [4, 5])])
def test_resume_from_older_checkpoint_keeps_new_ones(keep, expect, data, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(argv(data, out, "--steps", "8", "--save-every", "2", "--keep", "0"), capsys)
    assert code == 0, err
    assert checkpoints(out) == [2, 4, 6, 8]
    # go back to step 2 and end at step 5: the new checkpoints 4 and 5 are the ones kept
    code, err = run(argv(data, out, "--steps", "5", "--save-every", "2", "--keep", str(keep), "--force",
                         "--resume", str(out / "checkpoint-2")), capsys)
    assert code == 0, err
    assert checkpoints(out) == expect
    ckpt = latest(out)
    assert ckpt.name == "checkpoint-5"
    assert torch.load(ckpt / "state.pt", weights_only=True)["step"] == 5


def test_checkpoint_files_and_folders_are_fsynced(data, tmp_path, capsys, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    out = tmp_path / "run"
    code, err = run(argv(data, out, "--steps", "1", "--save-every", "1"), capsys)
    assert code == 0, err
    names = {Path(p).name for p in synced}
    for name in FILES:  # written under the temporary folder, synced before the rename
        assert any(Path(p).name == name and ".checkpoint-1.tmp" in p for p in synced), (name, synced)
    assert str(out.resolve()) in synced  # the rename itself
    assert any(n == "latest" or is_temporary_of(n, "latest") for n in names), names  # latest's own temporary


# ---------------------------------------------------------------------------------------
# 3. non-finite steps are skipped and logged; a run of them stops with a finite checkpoint
# ---------------------------------------------------------------------------------------
def poison_losses(monkeypatch, bad) -> list[int]:
    """Make the loss of the micro-batches whose 1-based call number is in `bad` NaN (a stand-in for
    an fp16 overflow or a broken row: the gradient of that step is NaN everywhere). (The store
    itself refuses NaN rows when they are read; this reaches the step.)"""
    from flame.loss import MultiPositiveSigmoidLoss

    real = MultiPositiveSigmoidLoss.rows  # a micro-batch's loss, on every path of the step
    calls: list[int] = []

    def rows(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        calls.append(len(calls) + 1)
        return loss * float("nan") if bad(calls[-1]) else loss

    monkeypatch.setattr(MultiPositiveSigmoidLoss, "rows", rows)
    return calls


def all_finite(ckpt: Path) -> bool:
    return all(torch.isfinite(v).all() for v in weights(ckpt).values())


def test_nonfinite_steps_are_skipped_logged_and_training_continues(data, tmp_path, capsys, monkeypatch):
    poison_losses(monkeypatch, lambda n: n in (3, 4, 9))
    out = tmp_path / "run"
    code, err = run(argv(data, out, "--steps", "14", "--save-every", "7", "--log-every", "1"), capsys)
    assert code == 0, err
    records = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["nonfinite"]] == [3, 4, 9]
    assert all(r["loss"] is None for r in records if r["nonfinite"])
    assert all(np.isfinite(r["loss"]) for r in records if not r["nonfinite"])
    for step in checkpoints(out):
        assert all_finite(out / f"checkpoint-{step}")
    # and the weights did train
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(weights(out / "checkpoint-7").values(),
                                                           weights(out / "checkpoint-14").values()))


def test_repeated_nonfinite_steps_stop_with_a_finite_checkpoint(data, tmp_path, capsys, monkeypatch):
    poison_losses(monkeypatch, lambda n: n >= 9)  # from step 9 on every step is NaN
    out = tmp_path / "run"
    code, err = run(argv(data, out, "--steps", "20", "--save-every", "1", "--max-nonfinite", "3"), capsys)
    assert code == 2
    line = one_line(err)
    assert "non-finite" in line and "3 consecutive" in line and "checkpoint-10" in line
    assert checkpoints(out)[-1] == 10
    assert latest(out).name == "checkpoint-10"
    for step in checkpoints(out):
        assert all_finite(out / f"checkpoint-{step}")


def test_weights_that_overflow_are_never_saved(data, tmp_path, capsys, monkeypatch):
    real = torch.optim.AdamW.step
    calls: list[int] = []

    def step(self, *args, **kwargs):  # the 3rd update overflows one weight matrix to inf
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    code, err = run(argv(data, out, "--steps", "6", "--save-every", "2", "--keep", "0"), capsys)
    assert code == 2
    line = one_line(err)
    assert "not finite at step 4" in line and "checkpoint-2" in line
    assert checkpoints(out) == [2] and all_finite(out / "checkpoint-2") and latest(out).name == "checkpoint-2"


# ---------------------------------------------------------------------------------------
# 4. an error on one torchrun rank inside the loop stops the whole job promptly
# ---------------------------------------------------------------------------------------
def torchrun(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN_2, "-m", "flame", *args]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_error_on_rank_1_inside_the_loop_stops_every_rank(tmp_path):
    import webdataset as wds

    root = make_set(tmp_path / "set", shards=2, per=16)
    order = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    random.Random(0).shuffle(order)
    rank1 = Path(order[1])  # rank 1's only shard in epoch 0: every image in it is broken
    samples = list(wds.tarfile_samples([{"url": str(rank1)}]))
    with wds.TarWriter(str(rank1)) as sink:
        for s in samples:
            sink.write({"__key__": s["__key__"], "jpg": b"not an image", "txt": s["txt"]})
    out = tmp_path / "run"
    # the collective timeout is 30 min: ending within the subprocess timeout means nobody waited for it
    proc = torchrun(argv(root, out, "--steps", "4", "--seed", "0"), timeout=150)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count("found no usable samples") == 1, text[-3000:]
    assert "rank 1" in text


@pytest.mark.slow
def test_full_disk_on_rank_0_under_torchrun_stops_every_rank(data, tmp_path):
    """Rank 0 fails to write a checkpoint while rank 1 waits for it: one line, both ranks stop."""
    import resource
    import signal

    def small_disk():  # model.safetensors (1.4 MB) fits, state.pt (2.9 MB) does not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    out = tmp_path / "run"
    cmd = [*TORCHRUN_2, "-m", "flame", *argv(data, out, "--steps", "4", "--save-every", "2")]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=150, preexec_fn=small_disk)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count("cannot write checkpoint") == 1 and "File too large" in text, text[-3000:]
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".checkpoint-*"))


# ---------------------------------------------------------------------------------------
# 5. one job per run folder
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_second_train_on_the_same_folder_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "flame", *argv(data, out, "--steps", "3000", "--save-every", "2",
                                                                    "--keep", "0", "--log-every", "1")],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint-2" / "state.pt").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:] if first.stderr else ""
            time.sleep(0.05)
        before = set(checkpoints(out))
        for extra in ([], ["--force"], ["--resume"]):
            code, err = run(argv(data, out, "--steps", "3000", "--save-every", "2", "--keep", "0", *extra), capsys)
            assert code == 2
            line = one_line(err)
            assert "in use" in line and str(out) in line
        assert before <= set(checkpoints(out)), "the refused job deleted the running job's checkpoints"
        assert first.poll() is None, "the first job died"
    finally:
        first.kill()
        first.wait()
    # SIGKILL drops the lock: the folder can be resumed at once
    code, err = run(argv(data, out, "--steps", "3000", "--save-every", "2", "--keep", "0", "--resume",
                         str(out / "checkpoint-2"), "--force", "--steps", "3"), capsys)
    assert code == 0, err


def test_lock_falls_back_with_one_line_where_flock_is_unsupported(data, tmp_path, capsys, monkeypatch, caplog):
    import fcntl

    def no_flock(*a, **k):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "run"
    code, err = run(argv(data, out, "--steps", "1"), capsys)
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if "lock" in r.getMessage()]
    assert len(warned) == 1 and "no other job" in warned[0], warned


# ---------------------------------------------------------------------------------------
# 6. resume: torn log line, changed data, --epochs schedule
# ---------------------------------------------------------------------------------------
def test_torn_log_line_does_not_block_resume(data, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    code, err = run(argv(data, out, "--steps", "4", "--save-every", "2", "--log-every", "1"), capsys)
    assert code == 0, err
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # a job killed mid-line
    code, err = run(argv(data, out, "--steps", "4", "--save-every", "2", "--log-every", "1", "--resume",
                         str(out / "checkpoint-2")), capsys)
    assert code == 0, err
    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert any("log.jsonl" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_resume_refuses_a_glob_that_gained_a_shard(data, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for p in sorted((data / "shards").glob("*.tar"))[:2]:
        shutil.copy(p, shards)
    glob = str(shards / "*.tar")
    out = tmp_path / "run"
    code, err = run(argv(data, out, "--steps", "4", "--save-every", "2", shards=glob), capsys)
    assert code == 0, err
    shutil.copy(data / "shards" / "shapes-00002.tar", shards)
    code, err = run(argv(data, out, "--steps", "4", "--save-every", "2", "--resume", shards=glob), capsys)
    assert code == 2
    line = one_line(err)
    assert "shapes-00002" in line and "--force" in line
    code, err = run(argv(data, out, "--steps", "6", "--save-every", "2", "--resume", "--force", shards=glob), capsys)
    assert code == 0, err


def test_resume_refuses_a_store_that_gained_a_shard(tmp_path, capsys):
    from flame.store import EmbeddingStore

    root = make_set(tmp_path / "set")
    npy = root / "store" / "shards" / "shapes-00002.npy"
    keys = root / "store" / "shards" / "shapes-00002.keys.json"
    saved = npy.read_bytes(), keys.read_bytes()
    npy.unlink()
    keys.unlink()  # the store lacks one shard: its images are skipped
    out = tmp_path / "run"
    code, err = run(argv(root, out, "--steps", "4", "--save-every", "2"), capsys)
    assert code == 0, err
    npy.write_bytes(saved[0])
    keys.write_bytes(saved[1])  # flame embed finished that shard later
    assert "shapes-00002" in EmbeddingStore(root / "store").shards
    code, err = run(argv(root, out, "--steps", "4", "--save-every", "2", "--resume"), capsys)
    assert code == 2
    line = one_line(err)
    assert "shapes-00002" in line and "store" in line and "--force" in line


def test_epochs_schedule_is_kept_on_resume(data, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for p in sorted((data / "shards").glob("*.tar"))[:2]:
        shutil.copy(p, shards)
    out = tmp_path / "run"
    # 64 samples, batch 8, 1 epoch -> 8 steps
    code, err = run(argv(data, out, "--epochs", "1", "--save-every", "4", "--keep", "0", shards=str(shards)), capsys)
    assert code == 0, err
    assert checkpoints(out) == [4, 8]
    shutil.copy(data / "shards" / "shapes-00002.tar", shards)  # now 1 epoch would be 12 steps
    code, err = run(argv(data, out, "--epochs", "1", "--save-every", "4", "--keep", "0", "--force", "--resume",
                         str(out / "checkpoint-4"), shards=str(shards)), capsys)
    assert code == 0, err
    assert checkpoints(out) == [4, 8]  # the schedule planned for this run: 8 steps
    assert json.loads((out / "train-config.json").read_text())["steps"] == 8
    # an explicit change of the schedule is honoured (with --force)
    code, err = run(argv(data, out, "--epochs", "1.5", "--save-every", "4", "--keep", "0", "--force", "--resume",
                         shards=str(shards)), capsys)
    assert code == 0, err
    assert checkpoints(out) == [4, 8, 12, 16, 18]


# ---------------------------------------------------------------------------------------
# 7. settings are coerced and validated (one line, exit 2) before anything is deleted
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,expect",
    [
        (["--lr", "0"], "--lr"),
        (["--lr=-1e-3"], "--lr"),
        (["--min-lr", "-1"], "--min-lr"),
        (["--batch-size", "-4"], "--batch-size"),
        (["--accum", "0"], "--accum"),
        (["--steps", "0"], "--steps"),
        (["--epochs", "-1"], "--epochs"),
        (["--workers", "-1"], "--workers"),
        (["--betas", "0.9", "1.0"], "--betas"),
        (["--betas", "-0.1", "0.9"], "--betas"),
        (["--eps", "0"], "--eps"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--crop-scale", "0", "1"], "--crop-scale"),
        (["--crop-scale", "0.9", "0.5"], "--crop-scale"),
        (["--crop-scale", "0.5", "1.5"], "--crop-scale"),
        (["--warmup", "-1"], "--warmup"),
        (["--keep", "-1"], "--keep"),
        (["--image-size", "0"], "--image-size"),
        (["--positives", "0"], "--positives"),
        (["--max-nonfinite", "0"], "--max-nonfinite"),
    ],
)
def test_bad_numbers_are_one_line(flags, expect, data, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(argv(data, out, "--steps", "2", *flags), capsys)
    assert code == 2
    assert expect in one_line(err)
    assert not list(out.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def two_checkpoints(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    assert flame_main(argv(data, out, "--steps", "2", "--save-every", "1", "--keep", "0")) == 0
    return out


@pytest.mark.parametrize(
    "yaml,expect",
    [
        ("lr: fast\n", "lr"),
        ("betas: 0.9\n", "betas"),
        ("steps: 2.5\n", "steps"),
        ("pool_first: maybe\n", "pool_first"),
        ("crop_scale: [0.9]\n", "crop_scale"),
        ("precision: fp8\n", "precision"),
    ],
)
def test_bad_yaml_is_one_line_and_force_deletes_nothing(yaml, expect, data, two_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml)
    code, err = run(argv(data, out, "--config", str(cfg), "--force"), capsys)
    assert code == 2
    assert expect in one_line(err)
    assert checkpoints(out) == [1, 2] and latest(out).name == "checkpoint-2"


def test_yaml_numbers_written_as_strings_are_coerced(data, tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("lr: 5e-4\nmin_lr: 1e-6\neps: 1e-8\nsteps: '2'\nbetas: ['0.9', 0.95]\npool_first: 'yes'\n")
    out = tmp_path / "run"
    code, err = run(argv(data, out, "--config", str(cfg)), capsys)
    assert code == 0, err
    saved = json.loads((out / "train-config.json").read_text())["config"]
    assert saved["lr"] == 5e-4 and saved["min_lr"] == 1e-6 and saved["steps"] == 2
    assert saved["betas"] == [0.9, 0.95] and saved["pool_first"] is True
