"""COCO and Flickr30k through CLIP_benchmark's protocol (issue 16, EVAL.md section 4): fixtures in
the wds layout clip-benchmark/wds_mscoco_captions and wds_flickr30k ship (shards of an image plus a
`txt` with one caption per line, a caption's newline escaped as the two characters `\\n`), every
metric (R@1/5/10 both ways) compared with the protocol by brute force on the model's own vectors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from support.commands import run_flame
from support.evalsets import add_member
from support.retrievalsets import brute_force, jpeg

from flame.evaluate.benchmark import Options, read_benchmark, run_benchmark
from flame.model import FlameModel

OPTS = Options(workers=0, progress=False)
FOLDERS = {"coco": "wds_mscoco_captions", "flickr30k": "wds_flickr30k"}


@pytest.fixture(scope="module")
def model_dir(eval_model_dir):
    return eval_model_dir


@pytest.fixture(scope="module")
def model(model_dir):
    return FlameModel.from_pretrained(model_dir)


def webp(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg(seed))).save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def captions_of(i: int, n: int) -> list[str]:
    caps = [f"A man rides a bike down street {i} number {j}." for j in range(n)]
    if i == 2:
        caps[1] = "A dog\non a beach"  # a caption with its own newline: the writer escapes it
    return caps


def wds_retrieval(root: Path, counts: list[int], image_ext: str = "webp", shards: int = 2) -> tuple[Path, list]:
    """CLIP_benchmark's retrieval layout, as clip_benchmark_export_wds writes it: `counts[i]`
    captions for image i, the images spread over `shards` tars."""
    (root / "test").mkdir(parents=True)
    samples = [(f"s{i:09d}", (webp if image_ext == "webp" else jpeg)(i), captions_of(i, n)) for i, n in
               enumerate(counts)]
    for s in range(shards):
        with tarfile.open(root / "test" / f"{s}.tar", "w") as tf:
            for key, image, caps in samples[s::shards]:
                add_member(tf, f"{key}.{image_ext}", image)
                add_member(tf, f"{key}.txt", "\n".join(c.replace("\n", r"\n") for c in caps).encode())
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    order = [x for s in range(shards) for x in samples[s::shards]]  # shard 0's samples, then shard 1's
    return root, order


@pytest.mark.parametrize("name, counts, ext", [
    ("coco", [5, 6, 5, 4, 7, 5, 5, 5, 6, 5, 5, 5], "webp"),  # not always 5: the lines are counted
    ("flickr30k", [5] * 11, "jpg"),
])
def test_short_caption_retrieval_equals_the_protocol_by_hand(model, tmp_path, name, counts, ext):
    root, order = wds_retrieval(tmp_path / FOLDERS[name], counts, ext)
    data = read_benchmark(name, tmp_path, OPTS)  # ROOT above the folder works too
    captions = [c.replace("\n", r"\n") for _, _, caps in order for c in caps]
    assert data.captions == captions  # one per line, the escape left as CLIP_benchmark leaves it
    if name == "coco":
        assert r"A dog\non a beach" in data.captions
    owner = [i for i, (_, _, caps) in enumerate(order) for _ in caps]
    assert data.owner == owner and [it.key for it in data.items] == [k for k, _, _ in order]
    (result,) = run_benchmark(name, model, root, OPTS)
    ref = brute_force(model, [im for _, im, _ in order], captions, owner, ks=(1, 5, 10), first_max=False)
    assert result["metrics"] == pytest.approx(ref["metrics"], abs=1e-7)
    assert len(result["metrics"]) == 6
    assert result["ties"] == ref["ties"]
    assert (result["images"], result["texts"], result["context_length"]) == (len(counts), sum(counts), 512)
    assert (result["prompts"], result["truncated"], result["task"]) == ("long", 0, "zeroshot_retrieval")


def _eval(capsys, model_dir, name, root, *args):
    return run_flame(capsys, "eval", "--benchmark", name, "--dataset", root, "--model", model_dir, "--workers", "0",
                     "--no-progress", *args)


def test_a_root_that_is_not_the_benchmark_says_what_was_expected(capsys, model_dir, tmp_path):
    (tmp_path / "Urban1k" / "image").mkdir(parents=True)
    r = _eval(capsys, model_dir, "coco", tmp_path / "Urban1k")
    assert r.code == 2
    assert "is not coco: expected wds_mscoco_captions/ in CLIP_benchmark's wds layout: test/nshards.txt" in r.error
    root, _ = wds_retrieval(tmp_path / "wds_flickr30k", [5, 5])
    (root / "dataset_type.txt").write_text("classification\n")
    r = _eval(capsys, model_dir, "flickr30k", root)
    assert r.code == 2 and "dataset_type.txt says 'classification'" in r.error


def test_a_caption_member_that_is_not_utf8_is_one_line(capsys, model_dir, tmp_path):
    root, _ = wds_retrieval(tmp_path / "wds_mscoco_captions", [5, 5, 5], shards=1)
    with tarfile.open(root / "test" / "0.tar", "a") as tf:
        add_member(tf, "s000000009.webp", webp(9))
        add_member(tf, "s000000009.txt", "caf\xe9 au lait".encode("latin-1"))
    r = _eval(capsys, model_dir, "coco", root)
    assert r.code == 2 and "member 's000000009.txt' is not UTF-8 text (byte 3)" in r.error


def test_a_sample_without_its_image_is_missing_unless_allowed(capsys, model_dir, model, tmp_path):
    root, order = wds_retrieval(tmp_path / "wds_flickr30k", [5, 5, 5, 5], shards=1)
    with tarfile.open(root / "test" / "0.tar", "a") as tf:
        add_member(tf, "s000000009.txt", b"a caption whose image is not in the shard")
    r = _eval(capsys, model_dir, "flickr30k", root)
    assert r.code == 2 and "flickr30k: 1 of 5 images are missing" in r.error and "s000000009" in r.error
    out = tmp_path / "r.json"
    assert _eval(capsys, model_dir, "flickr30k", root, "--allow-missing", "--output", out).code == 0
    (result,) = json.loads(out.read_text())
    assert (result["missing_images"], result["images"], result["texts"]) == (1, 4, 20)
    captions = [c for _, _, caps in order for c in caps]
    ref = brute_force(model, [im for _, im, _ in order], captions, [i // 5 for i in range(20)], ks=(1, 5, 10),
                      first_max=False)
    assert result["metrics"] == pytest.approx(ref["metrics"], abs=1e-7)
