"""Issue 20: without a terminal, progress is whole status lines (periodic and final), never the
carriage-return redraws of a bar; on a terminal it is tqdm's bar; a stage that did nothing writes
nothing (a refusal stays one line)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from support.commands import PROGRESS

from flame.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_a_log_gets_lines():
    from tqdm import tqdm

    bar = progress(total=3, desc="x", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress(total=3, desc="x", file=io.StringIO()), LineProgress)


def test_status_lines_are_periodic_whole_lines(monkeypatch):
    log = io.StringIO()
    monkeypatch.setenv("FLAME_PROGRESS_EVERY", "0")  # a line at every update
    bar = progress(total=4000, desc="train", unit="img", file=log)
    for _ in range(4):
        bar.update(1000)
        bar.set_postfix(loss="0.500")
    bar.write("a line beside it")
    bar.close()
    bar.close()  # once
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("[train] 1,000/4,000 img (25%), ") and lines[1].endswith("loss=0.500")
    assert lines[3].startswith("[train] 4,000/4,000 img (100%)")
    assert lines[4] == "a line beside it" and lines[5].startswith("[train] 4,000/4,000 img (100%)")
    assert len(lines) == 6 and all(PROGRESS.match(ln) for ln in lines if ln.startswith("["))


def test_lines_are_spaced_by_the_period_and_a_stage_that_did_nothing_is_silent(monkeypatch):
    log = io.StringIO()
    bar = progress(total=10**6, desc="embed", file=log)  # the default period: 30 s
    for _ in range(10**4):
        bar.update(100)
    assert log.getvalue() == ""  # far faster than one period: no line until the end
    bar.close()
    assert len(log.getvalue().splitlines()) == 1
    idle = io.StringIO()
    progress(total=5, desc="refused", file=idle).close()
    assert idle.getvalue() == ""
    off = io.StringIO()
    bar = progress(total=5, file=off, enabled=False)
    bar.update(5)
    bar.close()
    assert off.getvalue() == ""


def test_a_training_run_logged_to_a_file_has_no_carriage_returns(tmp_path):
    """The whole `flame train` output into a file (what CI and nohup see)."""
    from support.training import TINY, make_set

    root = make_set(tmp_path / "d", shards=1, per=16)
    log = tmp_path / "train.log"
    tiny = [a for a in TINY if a != "--no-progress"]
    cmd = [sys.executable, "-m", "flame", "train", "--data", str(root / "shards"), "--embeddings", str(root / "store"),
           "--out", str(tmp_path / "run"), *tiny, "--batch-size", "4", "--workers", "0", "--steps", "3",
           "--warmup", "1"]
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "FLAME_PROGRESS_EVERY": "0"})
    text = log.read_text()
    assert p.returncode == 0, text
    assert "\r" not in text
    assert sum(1 for ln in text.splitlines() if ln.startswith("[train] ")) >= 3
