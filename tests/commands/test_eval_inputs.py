"""`flame eval` on inputs from strangers, end to end with a tiny model: names that are not UTF-8,
table rows naming a FIFO or /dev/zero, huge / sparse / truncated tar members, out-of-range labels,
empty and unreadable sets, TIFF/GIF in class folders. Each is either evaluated correctly or
refused in one line with exit 2; completed work (an earlier results file, cached vectors) stays."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from support.commands import run_flame
from support.evalsets import COLOURS, add_member, class_folder, png, wds_set

from flame.errors import FlameError


@pytest.fixture(scope="module")
def model(eval_model_dir):
    return eval_model_dir


def _eval(capsys, model, dataset, *args):
    return run_flame(capsys, "eval", "--model", model, "--dataset", dataset, "--workers", "0", "--no-progress", *args)


def _results(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- names that are not UTF-8 ------------------------------------------------------------------
def test_file_and_member_names_that_are_not_utf8_are_evaluated(model, capsys, tmp_path):
    names = {"red": [b"caf\xe9.png", b"IMG_0001.png"], "blue": [b"\xff\xfe\x81.png", b"ok.png"]}  # latin-1, junk
    folder = class_folder(tmp_path / "photos", names=names)
    assert any(b"\xe9" in n for n in os.listdir(os.fsencode(folder / "red")))  # really those bytes on disk
    out = tmp_path / "r.json"
    r = _eval(capsys, model, folder, "--output", out)
    assert r.code == 0, r.err
    res = _results(out)
    assert res["images"] == 4 and res["skipped_images"] == 0

    shards = wds_set(tmp_path / "wds", [(b"cam\xe9\x01", "0"), (b"zip\x8f\x90", "1"), ("plain", "0")])
    r = _eval(capsys, model, shards, "--output", out)
    assert r.code == 0, r.err
    res = _results(out)
    assert res["images"] == 3 and res["skipped_images"] == 0
    again = _eval(capsys, model, shards, "--output", out)  # the cache entry keyed by those bytes is found again
    assert again.code == 0 and _results(out)["metrics"] == res["metrics"]


# ---- tables naming any path ---------------------------------------------------------------------
EVAL_LIMITED = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a runaway read fails here, not the machine
from flame.cli import main
code = main(sys.argv[1:])
print("maxrss_kb", int(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')).split()[1]))
sys.exit(code)
"""


def _flame_limited(args: list, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t = time.time()
    try:
        r = subprocess.run([sys.executable, "-c", EVAL_LIMITED, *map(str, args)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flame {args[0]} still running after {timeout} s (blocked, or reading forever)")
    return r, time.time() - t


@pytest.mark.slow
def test_table_rows_naming_a_fifo_and_dev_zero_are_skipped_at_once(model, tmp_path):
    root = tmp_path / "table"
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(20):
        (root / "img" / f"{i}.png").write_bytes(png(list(COLOURS.values())[i % 2], seed=i))
        rows.append({"image": f"img/{i}.png", "caption": f"a {list(COLOURS)[i % 2]} photo number {i}"})
    os.mkfifo(root / "img" / "pipe.jpg")
    rows += [{"image": "/dev/zero", "caption": "endless zeros"}, {"image": "img/pipe.jpg", "caption": "a pipe"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    r, seconds = _flame_limited(["eval", "--model", model, "--dataset", root, "--workers", "0", "--no-progress",
                                 "--output", out], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = _results(out)
    assert res["images"] == 22 and res["skipped_images"] == 2  # 2 of 22 (9%): under the 10% allowed
    maxrss_kb = int(r.stdout.split("maxrss_kb")[1])
    assert maxrss_kb < 2_500_000, f"{maxrss_kb // 1024} MB: /dev/zero was read"


# ---- tar members: huge, sparse, truncated ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar makes the sparse member")
def test_a_sparse_20gb_member_is_refused_without_reading_it(model, tmp_path):
    root = wds_set(tmp_path / "wds", [("a", "0"), ("b", "1")])
    work = tmp_path / "work"
    work.mkdir()
    with open(work / "huge.png", "wb") as f:  # 20 GB declared, no block stored (a sparse file)
        f.truncate(20 << 30)
    (work / "huge.cls").write_text("1")
    shard = root / "test" / "1.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(shard), "huge.png", "huge.cls"], cwd=work, check=True)
    (work / "huge.png").unlink()
    assert shard.stat().st_size < 100_000
    with tarfile.open(shard) as tf:
        assert tf.getmember("huge.png").issparse()
    (root / "test" / "nshards.txt").write_text("2\n")
    r, seconds = _flame_limited(["eval", "--model", model, "--dataset", root, "--workers", "0", "--no-progress"],
                                timeout=240)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "huge.png" in r.stderr and "sparse" in r.stderr


def test_a_member_declaring_20gb_in_a_small_gzip_tar_is_refused(model, capsys, tmp_path):
    root = wds_set(tmp_path / "wds", [("a", "0"), ("b", "1")])
    cls = tarfile.TarInfo("bomb.cls")
    cls.size = 1
    head = tarfile.TarInfo("bomb.png")
    head.size = 20 * 10**9
    raw = (cls.tobuf(tarfile.GNU_FORMAT) + b"1".ljust(512, b"\0")  # its label, then the image's header and
           + head.tobuf(tarfile.GNU_FORMAT) + png((1, 2, 3)).ljust(1024, b"\0"))  # what fits in 10 MB (a bit)
    (root / "test" / "1.tar").write_bytes(gzip.compress(raw))
    (root / "test" / "nshards.txt").write_text("2\n")
    r = _eval(capsys, model, root)
    assert r.code == 2 and "bomb.png" in r.error and "20,000,000,000 bytes" in r.error


def test_a_truncated_compressed_tar_is_one_line(model, capsys, tmp_path):
    root = wds_set(tmp_path / "wds", [(f"s{i}", str(i % 2)) for i in range(6)], mode="w:gz")
    shard = root / "test" / "0.tar"
    data = shard.read_bytes()
    out = tmp_path / "r.json"
    assert _eval(capsys, model, root, "--output", out).code == 0
    before = out.read_bytes()
    for cut in (len(data) // 2, 40):  # inside the members; inside the first header
        shard.write_bytes(data[:cut])
        r = _eval(capsys, model, root, "--output", out)
        assert r.code == 2 and "truncated or corrupt" in r.error and "0.tar" in r.error, r.err
    shard.write_bytes(data[:30] + bytes(b ^ 0x5A for b in data[30:60]) + data[60:])  # corrupt deflate data
    r = _eval(capsys, model, root, "--output", out)
    assert r.code == 2 and "0.tar" in r.error
    assert out.read_bytes() == before  # the completed results are not touched


# ---- labels ------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["-1", "2", "1000000000"])
def test_a_label_outside_the_classes_is_refused_naming_the_sample(model, capsys, tmp_path, label):
    root = wds_set(tmp_path / "wds", [("good0", "0"), ("bad", label), ("good1", "1")])
    from flame.evaluate import load_dataset

    with pytest.raises(FlameError, match=f"sample bad .*label {label}: a label must be 0..1"):
        load_dataset(root)
    if label == "-1":  # through the command, for both tasks
        for task in ("zeroshot-classification", "linear-probe"):
            r = _eval(capsys, model, root, "--task", task)
            assert r.code == 2 and "sample bad" in r.error and "label -1" in r.error


# ---- empty and unreadable sets -----------------------------------------------------------------
def _broken_folder(root: Path, good: int, bad: int) -> Path:
    class_folder(root, per_class=good)
    for i in range(bad):
        (root / "red" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def test_no_readable_image_is_one_line(model, capsys, tmp_path):
    root = _broken_folder(tmp_path / "photos", good=0, bad=2)
    for c in COLOURS:  # every class folder holds only broken files
        (root / c).mkdir(exist_ok=True)
        (root / c / "x.png").write_bytes(b"\x89PNG broken")
    for task in ("zeroshot-classification", "linear-probe"):
        r = _eval(capsys, model, root, "--task", task)
        assert r.code == 2 and "none of the 4 test images could be read" in r.error, r.err
    table = tmp_path / "table.csv"
    table.write_text("image,caption\nphotos/red/broken0.jpg,a red thing\nphotos/red/broken1.jpg,a red one\n")
    r = _eval(capsys, model, table)
    assert r.code == 2 and "none of the 2 test images could be read" in r.error


def test_an_empty_split_is_one_line(model, capsys, tmp_path):
    root = wds_set(tmp_path / "wds", [])
    with tarfile.open(root / "test" / "0.tar", "w") as tf:  # images without labels
        add_member(tf, "a.png", png((1, 2, 3)))
    r = _eval(capsys, model, root)
    assert r.code == 2 and "test split has no labelled images" in r.error
    table = tmp_path / "t.csv"
    table.write_text("image,caption\nx.png,\n")  # no caption anywhere
    r = _eval(capsys, model, table)
    assert r.code == 2 and "test split has no captioned images" in r.error


def test_a_mostly_unreadable_set_is_refused_unless_allowed(model, capsys, tmp_path):
    root = _broken_folder(tmp_path / "photos", good=2, bad=6)  # 6 of 10 unreadable
    out = tmp_path / "r.json"
    out.write_text('{"earlier": "results"}\n')
    r = _eval(capsys, model, root, "--output", out)
    assert r.code == 2 and "6 of the 10 test images (60%) could not be read" in r.error
    assert "--max-unreadable 0.60" in r.error
    assert out.read_text() == '{"earlier": "results"}\n'  # nothing half written over earlier results
    r = _eval(capsys, model, root, "--output", out, "--max-unreadable", "0.6")
    assert r.code == 0, r.err
    assert _results(out)["skipped_images"] == 6 and _results(out)["images"] == 10
    r = _eval(capsys, model, root, "--max-unreadable", "1.5")
    assert r.code == 2 and "--max-unreadable" in r.error


# ---- formats in class folders ------------------------------------------------------------------
def test_tiff_and_gif_are_not_listed_in_class_folders(model, capsys, tmp_path):
    from PIL import Image

    from flame.evaluate import load_dataset

    root = class_folder(tmp_path / "photos", per_class=2)
    for c, colour in COLOURS.items():
        Image.new("RGB", (16, 16), colour).save(root / c / "scan.tif")
        Image.new("RGB", (16, 16), colour).save(root / c / "anim.gif")
    ds = load_dataset(root)
    assert sorted(Path(it.file).suffix for it in ds.items()) == [".png"] * 4
    out = tmp_path / "r.json"
    r = _eval(capsys, model, root, "--output", out)
    assert r.code == 0 and _results(out)["skipped_images"] == 0 and _results(out)["images"] == 4
    only = tmp_path / "scans"
    for c, colour in COLOURS.items():
        (only / c).mkdir(parents=True)
        Image.new("RGB", (16, 16), colour).save(only / c / "scan.tiff")
    r = _eval(capsys, model, only)
    assert r.code == 2 and "TIFF and GIF images are not read" in r.error


def test_a_symlink_to_a_regular_file_outside_is_followed_anything_else_is_not_read(model, capsys, tmp_path):
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(png((220, 20, 20)))
    root = class_folder(tmp_path / "photos", per_class=2)
    (root / "red" / "linked.png").symlink_to(outside)
    (root / "blue" / "zero.png").symlink_to("/dev/zero")  # not a regular file: not listed
    os.mkfifo(tmp_path / "pipe")
    (root / "blue" / "pipe.png").symlink_to(tmp_path / "pipe")
    from flame.evaluate import load_dataset

    ds = load_dataset(root)
    assert sorted(Path(it.file).name for it in ds.items()) == ["0.png", "0.png", "1.png", "1.png", "linked.png"]
    out = tmp_path / "r.json"
    r = _eval(capsys, model, root, "--output", out)
    assert r.code == 0 and _results(out)["images"] == 5 and _results(out)["skipped_images"] == 0
