"""`flame eval --benchmark xm3600` (EVAL.md 2.1): captions.jsonl with one object per language holding
three parallel lists, images/<key>.jpg, in CLIP_benchmark's `<root>/xm3600/` layout; every
language's R@1 against a brute force on the model's own vectors with caption[0] (the captions
and images also compared with clip-benchmark's own annotation files), the mean entry, and the
refusals (unknown language codes, missing images, captions that are not UTF-8, a ROOT that is not
XM3600). The tiny random model's text vectors are close to one another, so its recalls are near
chance; which captions are used is checked string for string against clip-benchmark instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.commands import run_flame
from support.zeroshot import recall_at_1, same_metrics, write_image

from flame.errors import FlameError
from flame.evaluate.benchmark import Options, read_benchmark, run_benchmark
from flame.evaluate.benchmark import multilingual as ML

OPTS = Options(workers=0, progress=False)
N = 6
WORDS = ["a red bus", "the dog on a street", "two cats in the park", "café naïve 東京", "a man with a car",
         "water and sky"]


@pytest.fixture(scope="module")
def tiny(eval_model_dir):
    from flame.model import FlameModel

    return eval_model_dir, FlameModel.from_pretrained(str(eval_model_dir), device="cpu")


@pytest.fixture(autouse=True)
def six_images(monkeypatch):
    monkeypatch.setattr(ML, "XM3600_IMAGES", N)


def caption(lang: str, i: int, n: int) -> str:
    return f"{WORDS[(i + n) % len(WORDS)]} {lang} {n}"


def xm3600(root: Path, images: str = "images") -> tuple[Path, list[str]]:
    """CLIP_benchmark's layout: root/xm3600/captions.jsonl and root/xm3600/<images>/<key>.jpg."""
    data = root / "xm3600"
    keys = [f"{i:03x}a1b2c3d4e5f6f"[:16] for i in range(N)]
    lines = []
    for i, key in enumerate(keys):
        row = {"image/key": key, "image/locale": ML.XM3600_LANGUAGES[i]}
        for lang in ML.XM3600_LANGUAGES:
            caps = [caption(lang, i, n) for n in range(2 + i % 2)]
            row[lang] = {"caption": caps, "caption/tokenized": [c.replace(" ", " | ") for c in caps],
                         "caption/tokenized/lowercase": [c.lower() + " tok" for c in caps]}
        lines.append(json.dumps(row, ensure_ascii=False))
        write_image(data / images / f"{key}.jpg", 300 + i)
    data.mkdir(parents=True, exist_ok=True)
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data, keys


def test_every_language_against_its_first_caption(tiny, tmp_path):
    model = tiny[1]
    data, keys = xm3600(tmp_path)
    results = run_benchmark("xm3600", model, tmp_path, OPTS)
    assert [r["language"] for r in results] == [*ML.XM3600_LANGUAGES, "mean"]
    files = [data / "images" / f"{k}.jpg" for k in keys]
    for r in results[:-1]:
        assert (r["benchmark"], r["dataset"], r["task"], r["prompts"]) == ("xm3600", "crossmodal3600",
                                                                          "zeroshot_retrieval", "raw")
        assert (r["images"], r["texts"], r["truncated"], r["context_length"]) == (N, N, 0, 512)
        assert set(r["ties"]) == {"image_retrieval", "text_retrieval"}
        same_metrics(r, recall_at_1(model, files, [caption(r["language"], i, 0) for i in range(N)]))
    mean = results[-1]
    assert mean["languages"] == list(ML.XM3600_LANGUAGES)
    assert mean["ties"] == {d: sum(r["ties"][d] for r in results[:-1]) for d in ("image_retrieval", "text_retrieval")}
    for k in ML.METRICS:
        assert mean["metrics"][k] == pytest.approx(sum(r["metrics"][k] for r in results[:-1]) / 36)


def test_the_captions_are_clip_benchmarks(tmp_path):
    """clip-benchmark's own annotation file per language (first caption, image paths) = what we read."""
    from clip_benchmark.datasets.crossmodal3600 import OUTPUT_FILENAME_TEMPLATE, create_annotation_file

    xm3600(tmp_path)
    read = read_benchmark("xm3600", tmp_path, OPTS)
    for lang in ML.XM3600_LANGUAGES:
        create_annotation_file(str(tmp_path), lang)
        ref = json.loads((tmp_path / OUTPUT_FILENAME_TEMPLATE.format(lang)).read_text("utf-8"))
        assert ref["annotations"] == read.captions[lang]
        assert ref["image_paths"] == [str(p) for p in read.images]


def test_a_language_subset_and_the_images_one_level_down(tiny, tmp_path):
    model = tiny[1]
    data, keys = xm3600(tmp_path, images="images/xm3600-images")
    results = run_benchmark("xm3600", model, data, Options(workers=0, progress=False, languages=("fil", "quz")))
    assert [r["language"] for r in results] == ["fil", "quz", "mean"]
    files = [data / "images" / "xm3600-images" / f"{k}.jpg" for k in keys]
    same_metrics(results[1], recall_at_1(model, files, [caption("quz", i, 0) for i in range(N)]))


def test_the_command_writes_one_result_per_language_and_the_mean(tiny, capsys, tmp_path):
    xm3600(tmp_path)
    out = tmp_path / "r.json"
    r = run_flame(capsys, "eval", "--benchmark", "xm3600", "--dataset", tmp_path, "--model", tiny[0], "--language",
                  "en,zh", "--workers", "0", "--no-progress", "--output", out)
    assert r.code == 0, r.err
    saved = json.loads(out.read_text())
    assert [(s["benchmark"], s["language"]) for s in saved] == [("xm3600", "en"), ("xm3600", "zh"),
                                                                ("xm3600", "mean")]


# ---- bad input: one line, exit 2 ------------------------------------------------------------------
def _eval(capsys, model, root, *args):
    return run_flame(capsys, "eval", "--benchmark", "xm3600", "--dataset", root, "--model", model, "--workers", "0",
                     "--no-progress", *args)


def test_an_unknown_language_code_lists_the_36(tiny, capsys, tmp_path):
    xm3600(tmp_path)
    r = _eval(capsys, tiny[0], tmp_path, "--language", "de,tl")
    assert r.code == 2
    assert r.error.endswith(f"xm3600 has no language 'tl': its 36 codes are {' '.join(ML.XM3600_LANGUAGES)}")
    assert len(ML.XM3600_LANGUAGES) == 36


def test_a_missing_image_is_refused_and_allow_missing_records_it(tiny, capsys, tmp_path):
    data, keys = xm3600(tmp_path)
    (data / "images" / f"{keys[2]}.jpg").unlink()
    r = _eval(capsys, tiny[0], tmp_path)
    assert r.code == 2 and f"xm3600: 1 of {N} images are missing" in r.error and keys[2] in r.error
    results = run_benchmark("xm3600", tiny[1], tmp_path, Options(workers=0, progress=False, allow_missing=True,
                                                               languages=("de",)))
    assert results[0]["missing_images"] == 1 and results[0]["images"] == N - 1
    files = [data / "images" / f"{k}.jpg" for i, k in enumerate(keys) if i != 2]
    same_metrics(results[0], recall_at_1(tiny[1], files, [caption("de", i, 0) for i in range(N) if i != 2]))


def test_captions_that_are_not_utf8(tiny, capsys, tmp_path):
    data, _ = xm3600(tmp_path)
    raw = (data / "captions.jsonl").read_bytes()
    (data / "captions.jsonl").write_bytes(raw.replace("café".encode(), "café".encode("latin-1"), 1))
    r = _eval(capsys, tiny[0], tmp_path)
    assert r.code == 2 and "captions.jsonl is not UTF-8 text" in r.error


def test_a_root_that_is_not_xm3600(tiny, capsys, tmp_path):
    write_image(tmp_path / "photos" / "1.jpg", 1)
    r = _eval(capsys, tiny[0], tmp_path)
    assert r.code == 2
    assert r.error.endswith(f"{tmp_path} is not xm3600: expected captions.jsonl and images/<image/key>.jpg "
                            "(in ROOT or ROOT/xm3600/)")


def test_fewer_records_than_3600_or_a_language_left_out(tmp_path, monkeypatch):
    data, keys = xm3600(tmp_path)
    monkeypatch.setattr(ML, "XM3600_IMAGES", 3600)
    with pytest.raises(FlameError, match="xm3600: 6 images where the set as distributed has 3,600"):
        read_benchmark("xm3600", tmp_path, OPTS)
    monkeypatch.setattr(ML, "XM3600_IMAGES", N)
    rows = [json.loads(ln) for ln in (data / "captions.jsonl").read_text("utf-8").splitlines()]
    del rows[4]["sw"]
    (data / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.raises(FlameError, match=f"image {keys[4]} has no 'sw' caption"):
        read_benchmark("xm3600", tmp_path, OPTS)
