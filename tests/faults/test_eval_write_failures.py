"""Write failures in `flame eval` (issue 18 item 9): a read-only or full image cache is one warning
and the results are still produced; a passing failure (too many open files) is not cached as
"unreadable"; an unwritable --output is found before any work, one line and exit 2.

The read-only and full folders are real: a tmpfs mounted read-only, or a tiny tmpfs filled up, in
a private mount namespace (`unshare -m`, as root), so nothing outside the test sees them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

UNSHARE = shutil.which("unshare")


def can_mount() -> bool:
    if not UNSHARE or os.geteuid() != 0:
        return False
    r = subprocess.run([UNSHARE, "-m", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"], capture_output=True)
    return r.returncode == 0


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs root and unshare -m to mount a tmpfs")


def photo_set(root):
    for c, shade in (("red", 200), ("blue", 50)):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (shade + i, 0, 0)).save(root / c / f"{i}.png")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}\n")
    return root


# the image side of an evaluation, as `flame eval` runs it, with a model small enough for a unit test
SPLIT = textwrap.dedent("""
    import json, logging, resource, sys, torch
    from flame.evaluate import load_dataset
    from flame.evaluate.images import split_vectors

    class Model:
        fingerprint, image_size, mean, std, device = "m", 8, (0.5,) * 3, (0.5,) * 3, torch.device("cpu")
        def transform(self):
            return lambda im: torch.full((3, 8, 8), float(im.getpixel((0, 0))[0]) / 255)
        def encode_image(self, images):
            resource.setrlimit(resource.RLIMIT_NOFILE, LIMIT)  # decoded: descriptors are back for the cache
            return images.flatten(1)[:, :4]

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    dataset, cache, fds = sys.argv[1], sys.argv[2], sys.argv[3]
    ds = load_dataset(dataset)
    ds.items("test")
    LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)
    if fds == "none-left":  # every descriptor taken: opening an image fails with EMFILE
        import os
        free = 0
        while True:  # the lowest descriptor not open: the limit, so no open can succeed
            try:
                os.fstat(free)
                free += 1
            except OSError:
                break
        resource.setrlimit(resource.RLIMIT_NOFILE, (free, LIMIT[1]))
    vec = split_vectors(Model(), ds, workers=0, cache_dir=cache, progress=False)
    print(json.dumps({"ok": int(vec.ok.sum()), "n": len(vec.ok), "sum": float(vec.vectors.sum())}))
""")


def run_split(dataset, cache, fds="plenty", mount: str | None = None):
    cmd = [sys.executable, "-c", SPLIT, str(dataset), str(cache), fds]
    if mount is not None:  # mount the cache folder first, in a namespace of this command only
        script = f'{mount} && exec "$@"'
        cmd = [UNSHARE, "-m", "sh", "-c", script, "sh", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=os.environ)


@needs_mount
@pytest.mark.parametrize("how", ["read-only", "full"])
def test_a_read_only_or_full_cache_is_a_warning_and_the_results_come(tmp_path, how):
    data, cache = photo_set(tmp_path / "set"), tmp_path / "cache"
    cache.mkdir()
    if how == "read-only":
        mount = f"mount -t tmpfs -o ro,size=64k none {cache}"
    else:  # a 4 KiB tmpfs, filled to the last byte
        mount = (f"mount -t tmpfs -o size=4k none {cache} && "
                 f"(dd if=/dev/zero of={cache}/fill bs=1k count=64 2>/dev/null; true)")
    r = run_split(data, cache, mount=mount)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    warnings = [line for line in r.stderr.splitlines() if "not cached" in line]
    assert len(warnings) == 1, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    ref = run_split(data, tmp_path / "writable")
    assert got == json.loads(ref.stdout.strip().splitlines()[-1]) and got["ok"] == 6  # the same vectors
    assert not list(cache.iterdir())  # the mount is gone with its namespace: nothing written here


def test_too_many_open_files_is_not_cached_as_unreadable(tmp_path):
    data, cache = photo_set(tmp_path / "set"), tmp_path / "cache"
    first = run_split(data, cache, fds="none-left")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.strip().splitlines()[-1])["ok"] == 0  # every open failed (EMFILE)
    assert "passing reason" in first.stderr
    again = run_split(data, cache)  # descriptors back: every image is read, none remembered as unreadable
    assert json.loads(again.stdout.strip().splitlines()[-1])["ok"] == 6, again.stderr


@needs_mount
def test_an_unwritable_output_is_found_before_any_work(tmp_path):
    data, out = photo_set(tmp_path / "set"), tmp_path / "results"
    out.mkdir()
    # a model that does not exist: the output must be refused before the model is even looked for
    cmd = [sys.executable, "-m", "flame", "eval", "--model", str(tmp_path / "no-model"), "--dataset", str(data),
           "--output", str(out / "r.json")]
    script = f'mount -t tmpfs -o ro,size=64k none {out} && exec "$@"'
    r = subprocess.run([UNSHARE, "-m", "sh", "-c", script, "sh", *cmd], capture_output=True, text=True,
                       env=os.environ)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--output" in lines[0] and "Read-only file system" in lines[0], r.stderr
