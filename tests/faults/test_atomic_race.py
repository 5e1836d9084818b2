"""flame.fileio.write_atomic under concurrency and attack: two real processes writing one name
(an image-cache entry) many times at once both succeed and a reader never sees a partial file;
a symlink planted at a temporary name is never followed; a killed writer's temporary is found and
removed by the folder's owner (the run folder's, the store's, the image cache's cleanup)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flame import fileio

WRITES = 150  # per process
SIZE = 256 * 1024

# one writer: WRITES whole payloads "TAG|i|filler|sha256(TAG|i|filler)" to argv[1]
WRITER = r"""
import hashlib, os, sys
from flame.fileio import write_atomic
path, tag, n, size, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
while not os.path.exists(go):
    pass
for i in range(n):
    body = f"{tag}|{i}|".encode() + bytes([i % 251]) * size
    write_atomic(path, body + hashlib.sha256(body).hexdigest().encode())
"""


def _whole(data: bytes) -> bool:
    body, digest = data[:-64], data[-64:]
    return len(data) > 64 and hashlib.sha256(body).hexdigest().encode() == digest


def test_two_processes_writing_one_cache_entry_both_succeed_and_no_reader_sees_half(tmp_path):
    entry = tmp_path / "images" / "0123456789abcdef01234567.pt"  # an image-cache entry's name
    entry.parent.mkdir()
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(entry), tag, str(WRITES), str(SIZE), str(go)],
                              stderr=subprocess.PIPE) for tag in ("en", "it")]
    go.touch()
    reads = partial = 0
    while any(p.poll() is None for p in procs):
        try:
            data = entry.read_bytes()
        except FileNotFoundError:
            continue
        reads += 1
        partial += not _whole(data)
    errors = [p.stderr.read().decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert partial == 0, f"{partial} of {reads} reads saw a partial file under the final name"
    assert reads > 10
    data = entry.read_bytes()
    assert _whole(data) and data.split(b"|")[1] == str(WRITES - 1).encode()  # the last write of one of them
    assert sorted(os.listdir(entry.parent)) == [entry.name]  # no temporary left by either


def test_a_planted_symlink_at_the_temporary_name_is_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    entry = cache / "entry.pt"
    for name in ("entry.pt.tmp", ".entry.pt.tmp"):  # the old fixed name, and a guess at the new ones
        (cache / name).symlink_to(victim)
    fileio.write_atomic(entry, b"vectors")
    assert victim.read_text() == "precious"
    assert entry.read_bytes() == b"vectors" and not entry.is_symlink()
    entry.unlink()
    entry.symlink_to(victim)  # a symlink under the final name is replaced, not written through
    fileio.write_atomic(entry, b"vectors")
    assert victim.read_text() == "precious" and not entry.is_symlink() and entry.read_bytes() == b"vectors"


def test_a_written_file_has_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        fileio.write_atomic(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644  # readable by the other users of a shared cache


def _killed_write(path: Path) -> None:
    """write_atomic(path) in a process killed between the fsync and the rename."""
    code = f"from flame.fileio import write_atomic; write_atomic({str(path)!r}, b'half')"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FLAME_TEST_KILL_AT": "1"}, timeout=60)
    assert r.returncode == -signal.SIGKILL


def test_a_killed_writers_temporary_is_cleaned_by_the_run_folders_owner(tmp_path):
    from flame.train import clean_temporaries

    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text("checkpoint-2\n")
    _killed_write(run / "latest")
    left = [n for n in os.listdir(run) if n != "latest"]
    assert len(left) == 1 and fileio.is_temporary_of(left[0], "latest")
    assert (run / "latest").read_text() == "checkpoint-2\n"  # completed work untouched
    live = run / f".checkpoints.json~abcdefgh~{fileio._host()}~{os.getpid()}.tmp"  # a live writer's
    live.write_bytes(b"in flight")
    clean_temporaries(run)
    assert sorted(os.listdir(run)) == sorted(["latest", live.name])


def test_stale_temporaries_by_owner_and_age(tmp_path):
    host = fileio._host()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f".e.pt~aaaaaaaa~{host}~{dead.pid}.tmp": True,  # dead writer on this host
        f".e.pt~bbbbbbbb~{host}~{os.getpid()}.tmp": False,  # alive
        f".e.pt~cccccccc~elsewhere~{os.getpid()}.tmp": False,  # another host's, recent
        ".e.pt~dddddddd~elsewhere~1.tmp": True,  # another host's, a day old
        f".other.pt~eeeeeeee~{host}~{dead.pid}.tmp": None,  # another entry's (left alone when asked for e.pt)
        "e.pt": False,
    }
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    old = time.time() - fileio.STALE_S - 60
    os.utime(tmp_path / ".e.pt~dddddddd~elsewhere~1.tmp", (old, old))
    stale = {p.name for p in fileio.stale_temporaries(tmp_path, "e.pt")}
    assert stale == {n for n, s in names.items() if s}
    assert fileio.remove_stale_temporaries(tmp_path) == 3  # all entries: the other entry's too


@pytest.mark.parametrize("final", ["manifest.json", "x" * 250])
def test_temporary_names_stay_recognisable(tmp_path, final):
    (tmp_path / "d").mkdir()
    code = f"from flame.fileio import write_atomic; write_atomic({str(tmp_path / 'd' / final)!r}, b'x')"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FLAME_TEST_KILL_AT": "1"}, timeout=60)
    assert r.returncode == -signal.SIGKILL
    (left,) = os.listdir(tmp_path / "d")
    assert fileio.is_temporary_of(left, final) and len(os.fsencode(left)) <= 255
    assert [p.name for p in fileio.stale_temporaries(tmp_path / "d", final)] == [left]
