"""SugarCrepe and Winoground (`flame eval --benchmark sugarcrepe|winoground`) on fixtures in their
distributed layouts: every metric equals a brute-force computation of the protocol on the model's
own vectors, and CLIP_benchmark 1.6.2's own `image_caption_selection.evaluate` (with its SugarCrepe
dataset class) gives the same numbers with the same model; bad input is one line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.commands import run_flame
from support.compositional import (
    SUBSETS,
    sugarcrepe_brute,
    sugarcrepe_root,
    winoground_brute,
    winoground_root,
)

from flame.model import FlameModel

CATEGORIES = {"replace": ("replace_obj", "replace_att", "replace_rel"), "swap": ("swap_obj", "swap_att"),
              "add": ("add_obj", "add_att")}


@pytest.fixture(scope="module")
def folder(eval_model_dir):
    return eval_model_dir


@pytest.fixture(scope="module")
def model(folder):
    return FlameModel.from_pretrained(folder, device="cpu")


def _bench(capsys, folder, name, root, out, *args):
    return run_flame(capsys, "eval", "--benchmark", name, "--dataset", root, "--model", folder, "--workers", "0",
                     "--no-progress", "--output", out, *args)


class _Vectors(torch.nn.Module):
    """A CLIP-like model for CLIP_benchmark: FLAME's image tower on the preprocessed batch, FLAME's
    long-set text vectors for the texts its tokenizer numbered."""

    def __init__(self, model: FlameModel):
        super().__init__()
        self.model, self.texts = model, []

    def tokenize(self, texts):
        self.texts = list(texts)
        return torch.arange(len(texts))

    def encode_image(self, x):
        return self.model.encode_image(x)

    def encode_text(self, tokens):
        return self.model.encode_text([self.texts[int(i)] for i in tokens], prompts="long")


def _clip_benchmark(model, dataset, batch_size: int = 3) -> dict:
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import image_caption_selection

    wrapped = _Vectors(model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=image_captions_collate_fn)
    return image_caption_selection.evaluate(wrapped, loader, wrapped.tokenize, "cpu", amp=False)


# ---- SugarCrepe ----------------------------------------------------------------------------------
def test_sugarcrepe_metrics_equal_brute_force_and_clip_benchmark(folder, model, capsys, tmp_path):
    from clip_benchmark.datasets.sugar_crepe import SugarCrepe

    root = sugarcrepe_root(tmp_path / "sugar-crepe")
    assert list(json.loads((root / "add_obj.json").read_text())) == ["1", "3", "6", "7", "9"]  # keys skip numbers
    out = tmp_path / "r.json"
    r = _bench(capsys, folder, "sugarcrepe", root, out)
    assert r.code == 0, r.err
    results = {x["dataset"]: x for x in json.loads(out.read_text())}
    assert list(results) == [f"sugar_crepe/{s}" for s in SUBSETS] + [f"sugar_crepe/{c}" for c in CATEGORIES]
    brute = sugarcrepe_brute(model, root)
    assert sum(b["ties"] for b in brute.values()) == 1  # the item whose negative is its caption
    for s in SUBSETS:
        got, want = results[f"sugar_crepe/{s}"], brute[s]
        assert got["benchmark"] == "sugarcrepe" and got["task"] == "image_caption_selection"
        assert got["metrics"]["acc"] == pytest.approx(want["acc"])
        assert got["metrics"]["text_acc"] == got["metrics"]["acc"]
        assert got["metrics"]["image_acc"] == 1.0
        assert (got["items"], got["texts"], got["ties"], got["prompts"], got["truncated"]) == (
            want["items"], 2 * want["items"], want["ties"], "long", 0)
        theirs = _clip_benchmark(model, SugarCrepe(root=str(root / "val2017"), ann_file=str(root / f"{s}.json"),
                                                   transform=model.transform()))
        assert theirs == pytest.approx({k: got["metrics"][k] for k in ("acc", "text_acc", "image_acc")})
    for cat, members in CATEGORIES.items():  # micro-averages: items pooled, not subset accuracies averaged
        got = results[f"sugar_crepe/{cat}"]
        right, items = sum(brute[m]["right"] for m in members), sum(brute[m]["items"] for m in members)
        assert got["metrics"]["acc"] == pytest.approx(right / items) and got["items"] == items
        assert got["subsets"] == list(members) and got["average"] == "micro"
    tie = results["sugar_crepe/add_obj"]
    assert tie["ties"] == 1  # counted, and counted correct (CLIP_benchmark's argmax)

    clone = tmp_path / "clone"  # the repository as cloned: data/<subset>.json, val2017 beside it
    (clone / "data").mkdir(parents=True)
    shutil.copytree(root / "val2017", clone / "val2017")
    for s in SUBSETS:
        shutil.copy(root / f"{s}.json", clone / "data")
    r = _bench(capsys, folder, "sugarcrepe", clone, tmp_path / "c.json")
    assert r.code == 0, r.err
    assert [x["metrics"] for x in json.loads((tmp_path / "c.json").read_text())] == [
        x["metrics"] for x in results.values()]


def test_sugarcrepe_bad_input_is_one_line(folder, capsys, tmp_path):
    root = sugarcrepe_root(tmp_path / "sc")
    out = tmp_path / "r.json"
    r = _bench(capsys, folder, "sugarcrepe", tmp_path / "sc" / "val2017", out)  # not the benchmark
    assert r.code == 2 and "is not sugarcrepe: expected val2017/" in r.error and "swap_obj.json" in r.error

    (root / "val2017" / "000000000285.jpg").unlink()  # a missing image
    r = _bench(capsys, folder, "sugarcrepe", root, out)
    assert r.code == 2 and "images are missing" in r.error and "000000000285.jpg" in r.error
    assert not out.exists()
    r = _bench(capsys, folder, "sugarcrepe", root, out, "--allow-missing")  # the rest, recorded
    assert r.code == 0, r.err
    res = json.loads(out.read_text())
    assert all(x["missing_images"] == 1 for x in res) and all(x["images"] <= 5 for x in res)

    (root / "swap_att.json").write_bytes('{"0": {"caption": "caf\xe9"}}'.encode("latin-1"))  # not UTF-8
    r = _bench(capsys, folder, "sugarcrepe", root, out, "--allow-missing")
    assert r.code == 2 and "swap_att.json is not UTF-8" in r.error
    (root / "swap_att.json").write_text(json.dumps({"0": {"filename": "x.jpg", "caption": "a"}}))
    r = _bench(capsys, folder, "sugarcrepe", root, out, "--allow-missing")
    assert r.code == 2 and "item '0' needs the strings filename, caption, negative_caption" in r.error
    (root / "swap_att.json").unlink()
    r = _bench(capsys, folder, "sugarcrepe", root, out, "--allow-missing")
    assert r.code == 2 and "lacks swap_att.json" in r.error
    assert len(json.loads(out.read_text())) == 10  # the completed results file stays


# ---- Winoground ----------------------------------------------------------------------------------
class _WinogroundImages(torch.utils.data.Dataset):
    """What CLIP_benchmark's WinoGround dataset returns (it needs HF `datasets`, absent here):
    the two PIL images as decoded (RGBA stays RGBA) through the model's transform, and the captions."""

    def __init__(self, root: Path, transform):
        self.rows = [json.loads(ln) for ln in (root / "data" / "examples.jsonl").read_text().splitlines()]
        self.root, self.transform = root, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        imgs = [self.transform(Image.open(self.root / "data" / "images" / f"{r[f'image_{n}']}.png")) for n in range(2)]
        return torch.stack(imgs), [r["caption_0"], r["caption_1"]]


def test_winoground_metrics_equal_brute_force_and_clip_benchmark(folder, model, capsys, tmp_path):
    root = winoground_root(tmp_path / "winoground")
    assert Image.open(root / "data" / "images" / "ex_0_img_0.png").mode == "RGBA"
    out = tmp_path / "w.json"
    r = _bench(capsys, folder, "winoground", root, out)
    assert r.code == 0, r.err
    (got,) = json.loads(out.read_text())
    want = winoground_brute(model, root)
    assert got["metrics"] == pytest.approx(want["metrics"])
    assert (got["ties"], got["examples"], got["images"], got["texts"], got["prompts"]) == (
        want["ties"], 6, 12, 12, "long")
    assert got["ties"] >= 1  # example 0's two captions are the same text
    theirs = _clip_benchmark(model, _WinogroundImages(root, model.transform()))
    assert theirs == pytest.approx({k: got["metrics"][k] for k in ("acc", "text_acc", "image_acc")})

    # the same examples as data/<split>.parquet (image columns hold the PNG bytes), from ROOT/data
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(ln) for ln in (root / "data" / "examples.jsonl").read_text().splitlines()]
    pq_root = tmp_path / "winoground-parquet"
    (pq_root / "data").mkdir(parents=True)
    cols = {k: [r[k] for r in rows] for k in ("id", "caption_0", "caption_1", "tag")}
    for n in range(2):
        cols[f"image_{n}"] = [{"bytes": (root / "data" / "images" / f"{r[f'image_{n}']}.png").read_bytes(),
                               "path": None} for r in rows]
    pq.write_table(pa.table(cols), pq_root / "data" / "test-00000-of-00001.parquet")
    r = _bench(capsys, folder, "winoground", pq_root / "data", tmp_path / "p.json")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "p.json").read_text())[0]["metrics"] == pytest.approx(got["metrics"])


def test_winoground_bad_input_is_one_line(folder, capsys, tmp_path):
    root = winoground_root(tmp_path / "wg", examples=3)
    out = tmp_path / "w.json"
    r = _bench(capsys, folder, "winoground", tmp_path, out)  # not the benchmark
    assert r.code == 2 and "is not winoground: expected data/examples.jsonl" in r.error

    (root / "data" / "images" / "ex_2_img_1.png").unlink()
    r = _bench(capsys, folder, "winoground", root, out)
    assert r.code == 2 and "1 of 6 images are missing" in r.error and "ex_2_img_1.png" in r.error
    r = _bench(capsys, folder, "winoground", root, out, "--allow-missing")
    assert r.code == 0, r.err
    (res,) = json.loads(out.read_text())
    assert res["examples"] == 2 and res["missing_images"] == 1

    shutil.move(root / "data" / "images", tmp_path / "away")
    (root / "data" / "images.zip").write_bytes(b"PK")
    r = _bench(capsys, folder, "winoground", root, out)
    assert r.code == 2 and "images.zip is not unpacked" in r.error
    shutil.move(tmp_path / "away", root / "data" / "images")
    (root / "data" / "examples.jsonl").rename(root / "data" / "metadata.jsonl")  # the name some copies use
    r = _bench(capsys, folder, "winoground", root, tmp_path / "m.json", "--allow-missing")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "m.json").read_text())[0]["metrics"] == res["metrics"]
    (root / "data" / "metadata.jsonl").write_bytes(b'{"caption_0": "caf\xe9"}\n')
    r = _bench(capsys, folder, "winoground", root, out)
    assert r.code == 2 and "metadata.jsonl is not UTF-8" in r.error
    assert json.loads(out.read_text())[0]["examples"] == 2  # the completed results file stays


def test_count_truncated_counts_cached_texts_too(model):
    enc = model.text_encoder
    long = " ".join(["dog"] * 700)  # over the 512-token caption cap
    model.encode_text(["a dog", long], prompts="long")
    assert enc.count_truncated(["a dog", long, long], "long") == 1  # cached: still counted
    assert enc.count_truncated(["a dog", "a cat"], "long") == 0


class _Lookup(torch.nn.Module):
    """CLIP_benchmark's view of fixed vectors: an "image" is its row number, a text is its string."""

    def __init__(self, images: torch.Tensor, texts: dict[str, torch.Tensor]):
        super().__init__()
        self.images, self.texts, self.names = images, texts, list(texts)

    def tokenize(self, texts):
        return torch.tensor([self.names.index(t) for t in texts])

    def encode_image(self, x):
        return self.images[x.flatten(1)[:, 0].long()]

    def encode_text(self, tokens):
        return torch.stack([self.texts[self.names[int(i)]] for i in tokens])


def test_one_sided_ties_split_the_argmax_and_strict_scores_as_clip_benchmark_does():
    """Example 0 ties s(c0,i0) = s(c1,i0) exactly: CLIP_benchmark's argmax counts its text side
    correct (index 0 wins), the paper's strict score does not; the rest are random."""
    from clip_benchmark.metrics import image_caption_selection

    from flame.evaluate.benchmark.selection import instance_scores

    torch.manual_seed(0)
    n, d = 40, 8
    images = torch.nn.functional.normalize(torch.randn(2 * n, d), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(2 * n, d), dim=-1)
    images[0], images[1] = torch.eye(d)[0], torch.eye(d)[1]
    texts[0] = torch.tensor([0.6, -0.8] + [0.0] * (d - 2))
    texts[1] = torch.tensor([0.6, 0.8] + [0.0] * (d - 2))
    per = instance_scores(images.view(n, 2, d), texts.view(n, 2, d))
    assert per["tie"][0] and per["text_acc"][0] and not per["text_score"][0] and per["acc"][0]
    assert not per["group_score"][0] and per["image_score"][0]

    names = {f"t{i}": texts[i] for i in range(2 * n)}
    batches = [(torch.arange(2 * n, dtype=torch.float32).view(n, 2, 1, 1, 1)[a:a + 7],
                [[f"t{2 * e}", f"t{2 * e + 1}"] for e in range(a, min(n, a + 7))]) for a in range(0, n, 7)]
    model = _Lookup(images, names)
    theirs = image_caption_selection.evaluate(model, batches, model.tokenize, "cpu", amp=False)
    ours = {k: float(per[k].float().mean()) for k in ("acc", "text_acc", "image_acc")}
    assert theirs == pytest.approx(ours)
    # the strict scores, pair by pair
    s = (images.view(n, 2, 1, d) * texts.view(n, 1, 2, d)).sum(dim=-1)  # s[e, image, caption]
    strict_text = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    strict_image = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    assert torch.equal(per["text_score"], strict_text) and torch.equal(per["image_score"], strict_image)
