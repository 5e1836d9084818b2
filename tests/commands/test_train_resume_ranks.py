"""Multi-node resume (issue 15.3): every rank resolves `--resume` (`latest`) on its own, and on a
filesystem that is not yet consistent two ranks can see different checkpoints. They must not
start training from different steps (DDP never re-syncs them and unequal step counts hang):
the job stops with one line naming both, before any step. 2-process torchrun on gloo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from support.commands import TORCHRUN_2

FIXTURES = Path(__file__).parents[1] / "fixtures" / "v0"

# rank 1 sees the run folder as it was one checkpoint earlier (its `latest` not yet updated)
LAGGING = textwrap.dedent(
    """
    import importlib, os, sys
    from flame.cli import main

    plan = importlib.import_module("flame.train.plan")  # the module (flame.train.plan is also a function)

    seen = plan.latest_checkpoint
    def lagging(run):
        latest = seen(run)
        return latest.parent / "checkpoint-2" if os.environ["RANK"] == "1" else latest
    plan.latest_checkpoint = lagging
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_ranks_that_see_different_latest_checkpoints_stop_before_training(tmp_path):
    for name in ("data", "store-fp16", "run"):
        shutil.copytree(FIXTURES / name, tmp_path / name, symlinks=True)
    run = tmp_path / "run"
    state = torch.load(run / "checkpoint-4" / "state.pt", weights_only=True)
    torch.save({**state, "step": 2}, run / "checkpoint-2" / "state.pt")  # the fixture keeps no state for it
    script = tmp_path / "lagging.py"
    script.write_text(LAGGING)
    args = json.loads((FIXTURES / "expected.json").read_text())["run"]["train_args"]
    cmd = [*TORCHRUN_2, str(script), "train", *args, "--resume", "--force"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "resumes from" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "checkpoint-4 (step 4)" in lines[0] and "rank 1 from" in lines[0] and "checkpoint-2 (step 2)" in lines[0]
    assert "flame.errors" not in proc.stderr and "FlameError" not in proc.stderr  # (torchrun adds its own report)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing trained, nothing written
