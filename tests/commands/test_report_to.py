"""`--report-to jsonl,tensorboard,wandb`: which files a run writes, `--no-tensorboard` as the alias
it was, wandb optional (one line when asked for and missing) and, offline, logging the same
metrics as log.jsonl (read back from the W&B run file, tests/support/wandb_file.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.commands import run_flame
from support.training import make_set

from flame.errors import FlameError
from flame.train.logger import Logger, destinations

HAVE_WANDB = importlib.util.find_spec("wandb") is not None
RUN = ["--tower", "vit-tiny", "--image-size", "32", "--proj-hidden", "32", "--no-progress", "--batch-size", "8",
       "--workers", "0", "--warmup", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_set(tmp_path_factory.mktemp("report"), shards=1, per=16)


@pytest.mark.parametrize("report_to, tensorboard, expect", [
    (None, True, ("jsonl", "tensorboard")), (None, False, ("jsonl",)), ("jsonl", True, ("jsonl",)),
    ("tensorboard", True, ("tensorboard",)), ("none", True, ()), ("tensorboard,jsonl", True, ("tensorboard", "jsonl")),
])
def test_destinations(report_to, tensorboard, expect):
    assert destinations(report_to, tensorboard) == expect


def test_logger_writes_only_where_it_is_told(tmp_path):
    for names in (("jsonl",), ("tensorboard",)):
        run = tmp_path / "-".join(names)
        run.mkdir()
        logger = Logger(run, True, names, 0)
        logger.write({"step": 1, "loss": 0.5})
        logger.close()
        assert (run / "log.jsonl").exists() == ("jsonl" in names)
        assert (run / "tensorboard").exists() == ("tensorboard" in names)


@pytest.mark.parametrize("args, expect", [
    (["--report-to", "tensorboard", "--no-tensorboard"], "--no-tensorboard contradicts --report-to tensorboard"),
    (["--report-to", "jsonl,mlflow"], "--report-to must be none or a comma list of jsonl, tensorboard, wandb"),
])
def test_bad_report_to_is_one_line_exit_2(args, expect, data, tmp_path, capsys):
    r = run_flame(capsys, "train", "--data", data / "shards", "--embeddings", data / "store", "--out",
                  tmp_path / "run", *RUN, "--steps", "1", *args)
    assert r.code == 2 and expect in r.error, r.err


def test_wandb_asked_for_and_missing_is_one_line_exit_2(data, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(FlameError, match="wandb is not installed"):
        destinations("jsonl,wandb")
    r = run_flame(capsys, "train", "--data", data / "shards", "--embeddings", data / "store", "--out",
                  tmp_path / "run", *RUN, "--steps", "1", "--report-to", "jsonl,wandb")
    assert r.code == 2 and "--report-to wandb: wandb is not installed (pip install wandb" in r.error, r.err
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (optional: pip install wandb)")
def test_an_offline_wandb_run_logs_the_same_metrics_as_log_jsonl(data, tmp_path):
    from support.wandb_file import history

    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "flame", "train", "--data", str(data / "shards"), "--embeddings",
                           str(data / "store"), "--out", str(out), *RUN, "--steps", "4", "--report-to",
                           "jsonl,wandb"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "tensorboard").exists()
    records = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    assert files[0].name == f"run-{(out / 'wandb-id').read_text().strip()}.wandb"
    logged = history(files[0])
    expected = {r["step"]: {f"train/{k}": v for k, v in r.items() if k != "step" and isinstance(v, int | float)}
                for r in records}
    assert set(logged) == set(expected)
    for step, metrics in expected.items():
        assert set(logged[step]) == set(metrics), step
        for key, value in metrics.items():
            assert logged[step][key] == pytest.approx(value, rel=1e-12, abs=0), (step, key)
