"""Long-caption retrieval benchmarks (issue 16, EVAL.md section 1): each fixture written in the
benchmark's distributed layout, read and run through `run_benchmark`, every metric compared with
the protocol computed by brute force on the model's own vectors, captions checked string for
string; bad input (not the benchmark, a missing image, a caption file that is not UTF-8) one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.commands import run_flame
from support.retrievalsets import brute_force, write_jpeg

from flame.errors import FlameError
from flame.evaluate.benchmark import Options, longcaption, read_benchmark, run_benchmark
from flame.model import FlameModel

OPTS = Options(workers=0, progress=False)


@pytest.fixture(scope="module")
def model_dir(eval_model_dir):
    return eval_model_dir


@pytest.fixture(scope="module")
def model(model_dir):
    return FlameModel.from_pretrained(model_dir)


def check(model, name: str, root: Path, captions: list[str], images: list[Path], opts: Options = OPTS) -> dict:
    """The reader's pairs are exactly (captions, images); the result equals the brute-force protocol."""
    data = read_benchmark(name, root, opts)
    assert data.captions == captions
    assert [Path(it.file) for it in data.items] == images
    assert data.owner == list(range(len(images)))
    (result,) = run_benchmark(name, model, root, opts)
    ref = brute_force(model, images, captions, list(range(len(images))), ks=(1,), first_max=True)
    assert result["metrics"] == pytest.approx(ref["metrics"], abs=1e-7)
    assert set(result["metrics"]) == {"image_retrieval_recall@1", "text_retrieval_recall@1"}  # R@1 only
    assert result["ties"] == ref["ties"]
    assert (result["benchmark"], result["task"], result["prompts"]) == (name, "zeroshot_retrieval", "long")
    assert (result["images"], result["texts"], result["context_length"]) == (len(images), len(captions), 1024)
    assert result["truncated"] == 0 and result["skipped_images"] == 0
    return result


# ---- ShareGPT4V-1k -------------------------------------------------------------------------------
def sharegpt4v_record(i: int, image: str, caption: str) -> dict:
    return {"id": f"id{i}", "image": image,
            "conversations": [{"from": "human", "value": "<image>\nWhat is in the image?"},
                              {"from": "gpt", "value": caption}]}


def sharegpt4v_root(root: Path) -> tuple[Path, list[dict]]:
    data = root / "data"
    records = [
        sharegpt4v_record(0, "sam/images/sa_561780.jpg", "The image shows a narrow street lined with houses.\n\nOn the "
                          "left, a café sign reads 東京."),
        sharegpt4v_record(1, "coco/train2017/000000000009.jpg", "A plate of food.\nBroccoli on the right\n"),
        sharegpt4v_record(2, "sam/images/sa_2.jpg", "A red \"kite\" over a beach?"),  # flattened: data/sam/sa_2.jpg
        sharegpt4v_record(3, "llava/llava_pretrain/images/00000/000000010.jpg", "Two dogs\n\n\nrunning."),
        sharegpt4v_record(4, "sam/images/sa_561780.jpg", "The same street, from another caption."),  # same image
        sharegpt4v_record(5, "coco/train2017/000000000010.jpg", "Beyond the cut."),
        sharegpt4v_record(6, "missing/not_there.jpg", "Beyond the cut, and its image is not there."),
    ]
    for seed, rel in enumerate(["sam/images/sa_561780.jpg", "coco/train2017/000000000009.jpg", "sam/sa_2.jpg",
                                "llava/llava_pretrain/images/00000/000000010.jpg", "coco/train2017/000000000010.jpg"]):
        write_jpeg(data / rel, seed)
    (data / longcaption.SHAREGPT4V_JSON).write_text(json.dumps(records, indent=1, ensure_ascii=False), "utf-8")
    return data, records


def test_sharegpt4v_first_records_second_turn_newlines_as_spaces(model, tmp_path, monkeypatch):
    data, records = sharegpt4v_root(tmp_path / "ShareGPT4V")
    monkeypatch.setattr(longcaption, "SHAREGPT4V_RECORDS", 5)  # the first 5 of 7 (the real cut: 1,000)
    monkeypatch.setattr(longcaption, "READ_BYTES", 7)  # records and UTF-8 characters split across reads
    captions = [r["conversations"][1]["value"].replace("\n", " ") for r in records[:5]]
    assert captions[0] == "The image shows a narrow street lined with houses.  On the left, a café sign reads 東京."
    images = [data / "sam/images/sa_561780.jpg", data / "coco/train2017/000000000009.jpg", data / "sam/sa_2.jpg",
              data / "llava/llava_pretrain/images/00000/000000010.jpg", data / "sam/images/sa_561780.jpg"]
    check(model, "sharegpt4v-1k", tmp_path / "ShareGPT4V", captions, images)  # ROOT above data/ works
    check(model, "sharegpt4v-1k", data, captions, images)  # and ROOT = data/


def test_sharegpt4v_is_the_first_1000_records_of_a_longer_file(tmp_path):
    data = tmp_path / "data"
    write_jpeg(data / "sam/images/a.jpg", 0)
    write_jpeg(data / "coco/train2017/b.jpg", 1)
    recs = [sharegpt4v_record(i, ["sam/images/a.jpg", "coco/train2017/b.jpg"][i % 2], f"caption\n{i}")
            for i in range(1001)]
    recs[1000]["image"] = "sam/images/not_there.jpg"  # record 1,001 is not used: its missing image is no error
    (data / longcaption.SHAREGPT4V_JSON).write_text(json.dumps(recs), "utf-8")
    got = read_benchmark("sharegpt4v-1k", data, OPTS)
    assert got.captions == [f"caption {i}" for i in range(1000)]
    assert len(got.items) == 1000 and got.items[999].file == str(data / "coco/train2017/b.jpg")
    (data / longcaption.SHAREGPT4V_JSON).write_text(json.dumps(recs[:999]), "utf-8")
    with pytest.raises(FlameError, match="holds 999 records; ShareGPT4V-1k is its first 1000"):
        read_benchmark("sharegpt4v-1k", data, OPTS)


# ---- Urban-1k ------------------------------------------------------------------------------------
def urban_root(root: Path, n: int = 12) -> Path:
    base = root / "Urban1k"
    (base / "caption").mkdir(parents=True)
    for k in range(1, n + 1):
        write_jpeg(base / "image" / f"{k}.jpg", 10 + k)
        ending = "\n" if k % 2 else ""  # some files end in a newline, some do not
        second = f"\nA second line of {k}, never read." if k % 3 == 0 else ""
        (base / "caption" / f"{k}.txt").write_text(f"The image captures street {k}. A red bus.{ending}{second}")
    return base


def test_urban_pairs_by_stem_first_line_as_read(model, tmp_path):
    base = urban_root(tmp_path)
    data = read_benchmark("urban-1k", tmp_path, OPTS)
    stems = [Path(it.file).stem for it in data.items]
    assert stems == [str(k) for k in range(1, 13)]  # 10 after 9, not after 1
    captions = []
    for k in range(1, 13):
        with open(base / "caption" / f"{k}.txt") as f:
            captions.append(f.readlines()[0])  # the release's readlines()[0], newline kept
    assert captions[0].endswith("bus.\n") and captions[2] == "The image captures street 3. A red bus.\n"
    assert captions[1].endswith("bus.")
    check(model, "urban-1k", base, captions, [base / "image" / f"{k}.jpg" for k in range(1, 13)])


# ---- DCI -----------------------------------------------------------------------------------------
DCI_ANNOTATIONS = {
    "b_train.json": ("A water pump stands in front of three buildings.",
                     "The pump is painted green.\nBehind it, balconies. The roof is 3.5 m high</s>Sky"),
    "a_valid.json": ("A dog.", "It sits</s></s> on a mat..  Nothing else."),
    "z_test.json": ("Two cups on a table", "One is blue.\n\nThe other is red."),
    "c_test.json": ("A bike.", ""),
}
DCI_CAPTIONS = {  # the assembly (EVAL.md 1.3), by hand
    "b_train.json": "A water pump stands in front of three buildings. The pump is painted green. Behind it, balconies. "
                    "The roof is 3. 5 m high. Sky",
    "a_valid.json": "A dog. It sits. on a mat. Nothing else",
    "z_test.json": "Two cups on a table. One is blue. The other is red",
    "c_test.json": "A bike",
}


def dci_root(root: Path) -> Path:
    base = root / "densely_captioned_images"
    (base / "annotations").mkdir(parents=True)
    (base / "complete").mkdir()
    splits = {"train": ["b_train.json"], "valid": ["a_valid.json"], "test": ["z_test.json", "c_test.json"]}
    (base / "splits.json").write_text(json.dumps(splits))
    for seed, (name, (short, extra)) in enumerate(DCI_ANNOTATIONS.items()):
        image = f"sa_{1000 + seed}.jpg"
        write_jpeg(base / "photos" / image, 30 + seed)
        ann = {"image": image, "short_caption": short, "extra_caption": extra, "mask_data": {"0": {}},
               "mask_keys": ["0"], "summaries": {"base": ["not used"]}, "negatives": {"x": "not used"}}
        (base / "annotations" / name).write_text(json.dumps(ann))
    return base


def test_dci_all_three_splits_in_stored_order_caption_resplit(model, tmp_path):
    base = dci_root(tmp_path)
    order = ["b_train.json", "a_valid.json", "z_test.json", "c_test.json"]  # as splits.json stores them
    images = [base / "photos" / f"sa_{1000 + list(DCI_ANNOTATIONS).index(n)}.jpg" for n in order]
    check(model, "dci", tmp_path, [DCI_CAPTIONS[n] for n in order], images)


# ---- DOCCI ---------------------------------------------------------------------------------------
def docci_root(root: Path, images_folder: bool = True) -> tuple[Path, list[dict]]:
    base = root / "docci"
    rows = [{"example_id": f"{split}_{i:05d}", "split": split, "image_file": f"{split}_{i:05d}.jpg",
             "description": f"A close-up view of object {i} in {split}.\nIt is lit from the left."}
            for i, split in enumerate(["train", "test", "qual_dev", "test", "qual_test", "test", "train", "test"])]
    for seed, r in enumerate(rows):
        write_jpeg(base / ("images" if images_folder else "") / r["image_file"], 50 + seed)
    (base / longcaption.DOCCI_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, rows


def test_docci_test_split_in_file_order(model, tmp_path):
    base, rows = docci_root(tmp_path)
    test = [r for r in rows if r["split"] == "test"]
    assert [r["example_id"] for r in test] == ["test_00001", "test_00003", "test_00005", "test_00007"]
    captions = [r["description"].replace("\n", " ") for r in test]
    check(model, "docci", base, captions, [base / "images" / r["image_file"] for r in test])


def test_docci_images_unpacked_beside_the_descriptions_are_read_there(tmp_path):
    base, rows = docci_root(tmp_path, images_folder=False)
    data = read_benchmark("docci", tmp_path, OPTS)
    assert [it.file for it in data.items] == [str(base / r["image_file"]) for r in rows if r["split"] == "test"]


# ---- bad input: one line, exit 2 -----------------------------------------------------------------
def _eval(capsys, model_dir, name, root, *args):
    return run_flame(capsys, "eval", "--benchmark", name, "--dataset", root, "--model", model_dir, "--workers", "0",
                     "--no-progress", *args)


@pytest.mark.parametrize("name, expected", [
    ("urban-1k", "Urban1k/image/ and Urban1k/caption/"),
    ("sharegpt4v-1k", longcaption.SHAREGPT4V_JSON),
    ("dci", "densely_captioned_images/ holding splits.json, annotations/ and photos/"),
    ("docci", "docci_descriptions.jsonlines and images/"),
])
def test_a_root_that_is_not_the_benchmark_says_what_was_expected(capsys, model_dir, tmp_path, name, expected):
    urban_root(tmp_path / "other") if name != "urban-1k" else dci_root(tmp_path / "other")
    r = _eval(capsys, model_dir, name, tmp_path / "other")
    assert r.code == 2 and f"is not {name}: expected" in r.error and expected in r.error


def test_a_missing_image_is_refused_unless_allowed_and_then_recorded(capsys, model_dir, model, tmp_path):
    base = urban_root(tmp_path)
    (base / "image" / "10.jpg").unlink()
    r = _eval(capsys, model_dir, "urban-1k", base)
    assert r.code == 2 and "urban-1k: 1 of 12 images are missing" in r.error and "10.jpg" in r.error
    out = tmp_path / "r.json"
    r = _eval(capsys, model_dir, "urban-1k", base, "--allow-missing", "--output", out)
    assert r.code == 0
    (result,) = json.loads(out.read_text())
    assert result["missing_images"] == 1 and result["missing"] == [str(base / "image" / "10.jpg")]
    assert (result["images"], result["texts"]) == (11, 11)  # the pair leaves together: still 1:1
    kept = [k for k in range(1, 13) if k != 10]
    captions = [(base / "caption" / f"{k}.txt").read_text().split("\n")[0] for k in kept]
    captions = [c + "\n" if k % 2 else c for c, k in zip(captions, kept)]
    ref = brute_force(model, [base / "image" / f"{k}.jpg" for k in kept], captions, list(range(11)))
    assert result["metrics"] == pytest.approx(ref["metrics"], abs=1e-7)


def test_a_caption_file_that_is_not_utf8_is_one_line(capsys, model_dir, tmp_path):
    base = urban_root(tmp_path)
    (base / "caption" / "3.txt").write_bytes(b"caf\xe9 in Latin-1")
    r = _eval(capsys, model_dir, "urban-1k", base)
    assert r.code == 2 and "3.txt is not UTF-8" in r.error
    data, _ = sharegpt4v_root(tmp_path / "s4v")
    raw = (data / longcaption.SHAREGPT4V_JSON).read_bytes().replace("café".encode(), b"caf\xe9")
    (data / longcaption.SHAREGPT4V_JSON).write_bytes(raw)
    r = _eval(capsys, model_dir, "sharegpt4v-1k", data)
    assert r.code == 2 and f"{longcaption.SHAREGPT4V_JSON} is not UTF-8 text (byte {raw.index(b'caf') + 3})" in r.error


def test_a_caption_longer_than_the_cap_is_counted_as_truncated(model, tiny_llm_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    base = urban_root(tmp_path, n=3)
    (base / "caption" / "2.txt").write_text("a red car on the street " * 20)
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    assert tok("")["input_ids"] == []  # the tiny tokenizer adds no BOS: the cap is all caption
    short = max(len(tok((base / "caption" / f"{k}.txt").read_text())["input_ids"]) for k in (1, 3))
    cap = short + 3  # the real cap (1024) would need a longer context than the tiny LLM's
    assert len(tok("a red car on the street " * 20)["input_ids"]) > cap + 10
    monkeypatch.setattr(longcaption, "CONTEXT_LENGTH", cap)
    (result,) = run_benchmark("urban-1k", model, base, OPTS)
    assert (result["truncated"], result["context_length"]) == (1, cap)
    (again,) = run_benchmark("urban-1k", model, base, OPTS)  # from the text cache: counted again all the same
    assert again["truncated"] == 1 and again["metrics"] == result["metrics"]


def test_flame_eval_benchmark_exit_codes(model_dir, tmp_path):
    """The command itself, in a subprocess: exit 2 with one line for a missing image, 0 with
    --allow-missing and the results written."""
    base = urban_root(tmp_path, n=4)
    (base / "image" / "4.jpg").unlink()
    cmd = [sys.executable, "-m", "flame", "eval", "--benchmark", "urban-1k", "--dataset", str(tmp_path), "--model",
           str(model_dir), "--workers", "0", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    assert r.returncode == 2, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
        f"flame eval: error: urban-1k: 1 of 4 images are missing ({base / 'image' / '4.jpg'}); an incomplete set "
        "changes the metrics: add them, or pass --allow-missing to evaluate the rest (recorded in the results)"]
    r = subprocess.run(cmd + ["--allow-missing", "--output", str(tmp_path / "r.json")], capture_output=True,
                       text=True, env=os.environ)
    assert r.returncode == 0, r.stderr
    (result,) = json.loads((tmp_path / "r.json").read_text())
    assert (result["benchmark"], result["images"], result["missing_images"]) == ("urban-1k", 3, 1)


def test_the_cap_counts_the_tokenizers_bos_as_the_release_does(tiny_llm_dir, tmp_path):
    """context_length N (the release's `truncation=True, max_length=N` first pass) leaves N minus
    the tokenizer's own special tokens for the caption: 1023 for Mistral's BOS at 1024; the capped
    vectors live in their own cache space."""
    from tokenizers.processors import TemplateProcessing

    from flame.llm import load_llm
    from flame.prompts import PROMPT_SETS
    from flame.textenc import TextEncoder

    llm, tok = load_llm(str(tiny_llm_dir), device="cpu")
    te = TextEncoder({"llm": {"spec": str(tiny_llm_dir)}, "layer": [2]}, cache_dir=tmp_path)
    te._llm = (llm, tok)
    assert te._encoder(PROMPT_SETS["long"], 1024).max_caption_tokens == 1024  # no BOS: all caption
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                       special_tokens=[("<|endoftext|>", bos)])
    assert tok("")["input_ids"] == [bos]
    te._encoders.clear()
    enc = te._encoder(PROMPT_SETS["long"], 1024)
    assert enc.max_caption_tokens == 1023
    assert te.space_description("long", 1024) == {**te.space_description("long"), "context_length": 1024}
    long = "a red car on the street " * 10
    n = len(tok(long, add_special_tokens=False)["input_ids"])
    assert te.count_truncated(["a dog.", long], "long", context_length=n) == 1  # n with the BOS: one too many
    assert te.count_truncated([long], "long", context_length=n + 1) == 0
