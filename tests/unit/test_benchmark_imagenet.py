"""`flame eval --benchmark` for ImageNet-1k (torchvision's val layout, five languages), ImageNet-V2,
-A, -R, -Sketch and ObjectNet (EVAL.md 2.2 and 5): fixtures written in each set's distributed layout,
every metric compared with a brute-force computation of the protocol on the model's own vectors,
class names and labels compared with clip-benchmark's own dataset builders where they run offline.

The fixtures' labels are chosen from the model's own ranking (some images in their top-1 class,
some in a lower one), so that no metric is trivially 0 or 1. The text side is the costly part on the
tiny LLM (80 x 1000 prompts take a minute), so the 1000-class sets run with the first shipped template
(`one_template`) and the 200-class ones with the first two (`few_templates`, which exercises the mean
over templates); ImageNet-A runs the full 80 (marked slow), and
`test_the_package_files_are_what_is_evaluated` checks that every language's names and templates are
the package's files whole.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from support.commands import run_flame
from support.evalsets import add_member
from support.zeroshot import class_logits, classification, image_bytes, same_metrics, write_image

from flame.errors import FlameError
from flame.evaluate.benchmark import Options, read_benchmark, run_benchmark
from flame.evaluate.benchmark import imagenet as IN
from flame.evaluate.benchmark import imagenet_classes as IC
from flame.evaluate.classtexts import package_dir

OPTS = Options(workers=0, progress=False)
ALLOW = Options(workers=0, progress=False, allow_missing=True)
PACKAGE_TEMPLATES = IC.templates


@pytest.fixture(scope="module")
def tiny(eval_model_dir):
    from flame.model import FlameModel

    return eval_model_dir, FlameModel.from_pretrained(str(eval_model_dir), device="cpu")


@pytest.fixture
def model(tiny):
    return tiny[1]


@pytest.fixture
def few_templates(monkeypatch):
    monkeypatch.setattr(IC, "templates", lambda language="en": PACKAGE_TEMPLATES(language)[:2])


@pytest.fixture
def one_template(monkeypatch):
    """The 1000-class sets: the first shipped template only (1000 prompts per language)."""
    monkeypatch.setattr(IC, "templates", lambda language="en": PACKAGE_TEMPLATES(language)[:1])


def steered(model, tmp: Path, names: list[str], templates: list[str], ext: str, extra: int = 40,
            fixed: list[int] | None = None, fmt: str = "JPEG") -> list[tuple[Path, int]]:
    """(image, class) pairs: one image in each class of `fixed` (default: every class; image i of
    them named i), then `extra` images in their own 1st, 3rd or 8th-ranked class (top-1 hits,
    top-5 hits, misses)."""
    fixed = list(range(len(names))) if fixed is None else fixed
    n = len(fixed)
    pool = [write_image(tmp / "pool" / f"{c}{ext}", 7000 + c, fmt) for c in fixed]
    pool += [write_image(tmp / "pool" / f"x{i}{ext}", 9000 + i, fmt) for i in range(extra)]
    ranks = class_logits(model, pool[n:], names, templates).argsort(dim=1, descending=True)
    rank = [min(r, len(names) - 1) for r in (0, 2, 7)]
    return [(f, fixed[i] if i < n else int(ranks[i - n, rank[i % 3]])) for i, f in enumerate(pool)]


def place(pairs, root: Path, folder_of) -> list[tuple[Path, int]]:
    out = []
    for f, c in pairs:
        dest = root / folder_of(c) / f"img_{f.stem}{f.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(f, dest)
        out.append((dest, c))
    return out


def same_protocol(result, model, placed, names, templates) -> dict:
    """Every metric, and the count of images whose top-1 class is tied, as the brute force has them."""
    files, labels = [f for f, _ in placed], [c for _, c in placed]
    logits = class_logits(model, files, names, templates)
    expected = classification(logits, labels)
    same_metrics(result, expected)
    assert result["ties"] == sum(int((row == row.max()).sum()) > 1 for row in logits)
    return expected


def check(result, placed, names, templates, dataset: str, language: str = "en"):
    assert (result["dataset"], result["task"], result["language"]) == (dataset, "zeroshot_classification", language)
    assert (result["prompts"], result["classes"], result["templates"]) == ("raw", len(names), len(templates))
    assert (result["images"], result["texts"]) == (len(placed), len(names) * len(templates))


# ---- ImageNet-A / -R: 200 wnid folders, 200-way ---------------------------------------------------
def package_builder(name: str, root: Path):
    from clip_benchmark.datasets.builder import build_dataset

    return build_dataset(name, root=str(root), transform=None, download=False)


@pytest.mark.slow  # 16,000 prompts on the tiny LLM: about a minute
def test_imagenet_a_is_200_way_over_its_wnids_with_the_80_templates(model, tmp_path, monkeypatch):
    names, templates = IC.names("en", "imagenet-a"), IC.templates("en")
    assert (len(names), len(templates)) == (200, 80)
    order = IC.wnids("imagenet-a")
    placed = place(steered(model, tmp_path, names, templates, ".jpg"), tmp_path / "imagenet-a", order.__getitem__)
    (tmp_path / "imagenet-a" / "README.txt").write_text("ImageNet-A\n")  # as the tar has it
    monkeypatch.setitem(IN.TOTALS, "imagenet-a", len(placed))
    [result] = run_benchmark("imagenet-a", model, tmp_path, OPTS)  # ROOT holding imagenet-a/
    assert result["benchmark"] == "imagenet-a"
    check(result, placed, names, templates, "imagenet-a")
    expected = same_protocol(result, model, placed, names, templates)
    assert 0 < expected["acc1"] < expected["acc5"] < 1
    # clip-benchmark's own builder on the same folder: the same 200 names, the same label per image
    ds = package_builder("imagenet-a", tmp_path / "imagenet-a")
    assert ds.classes == names
    assert sorted((Path(p).name, y) for p, y in ds.samples) == sorted((f.name, c) for f, c in placed)


def test_imagenet_r_missing_class_is_refused_and_allow_missing_keeps_200_way(model, tmp_path, few_templates,
                                                                           monkeypatch):
    names, templates = IC.names("en", "imagenet-r"), IC.templates("en")
    order = IC.wnids("imagenet-r")
    root = tmp_path / "imagenet-r"
    placed = place(steered(model, tmp_path, names, templates, ".jpg"), root, order.__getitem__)
    monkeypatch.setitem(IN.TOTALS, "imagenet-r", len(placed))
    ds = package_builder("imagenet-r", root)
    assert ds.classes == names and len(ds.classes) == 200
    assert sorted((Path(p).name, y) for p, y in ds.samples) == sorted((f.name, c) for f, c in placed)
    gone = order[3]
    shutil.rmtree(root / gone)
    with pytest.raises(FlameError, match=rf"imagenet-r: 1 of 200 classes are missing \({gone}\).*--allow-missing"):
        read_benchmark("imagenet-r", root, OPTS)
    [result] = run_benchmark("imagenet-r", model, root, ALLOW)
    kept = [(f, c) for f, c in placed if c != 3]
    assert (result["missing_classes"], result["missing_classes_first"]) == (1, [gone])
    assert result["expected_images"] == len(placed)
    check(result, kept, names, templates, "imagenet-r")  # still 200 classes, labels unshifted
    same_protocol(result, model, kept, names, templates)


def test_a_folder_that_is_not_the_subset_is_not_this_benchmark(tmp_path):
    only_r = next(w for w in IC.wnids("imagenet-r") if w not in set(IC.wnids("imagenet-a")))
    write_image(tmp_path / "imagenet-a" / IC.wnids("imagenet-a")[0] / "a.jpg", 1)
    write_image(tmp_path / "imagenet-a" / only_r / "b.jpg", 2)
    with pytest.raises(FlameError, match=rf"is not imagenet-a: expected imagenet-a/<wnid>/.*{only_r} is not one of"):
        read_benchmark("imagenet-a", tmp_path, OPTS)


# ---- ImageNet-V2: label = int(folder name) ---------------------------------------------------------
def test_imagenetv2_labels_are_the_folder_numbers(model, tmp_path, one_template):
    names, templates = IC.names("en"), IC.templates("en")
    root = tmp_path / "ImageNetV2-matched-frequency"
    placed = place(steered(model, tmp_path, names, templates, ".jpeg", fixed=[0, 1, 2, 10, 100, 999]), root, str)
    missing = r"imagenetv2: \d+ of 1000 class folders are missing \(\d+, \d+, \d+ and \d+ more\)"
    with pytest.raises(FlameError, match=missing):
        read_benchmark("imagenetv2", tmp_path, OPTS)
    data = read_benchmark("imagenetv2", tmp_path, ALLOW)
    label = {Path(it.file).name: it.label for it in data.items}
    assert label["img_10.jpeg"] == 10 and label["img_2.jpeg"] == 2  # "10" sorts before "2" as a string
    assert sorted(label.items()) == sorted((f.name, c) for f, c in placed)
    [result] = run_benchmark("imagenetv2", model, tmp_path, ALLOW)
    assert result["expected_images"] == 10_000 and result["missing_class_folders"] == 1000 - len(set(label.values()))
    check(result, placed, names, templates, "imagenetv2")
    same_protocol(result, model, placed, names, templates)
    (root / "extra").mkdir()
    with pytest.raises(FlameError, match="extra is not an ImageNetV2 class folder"):
        read_benchmark("imagenetv2", tmp_path, OPTS)


# ---- ImageNet-Sketch: 1000 wnid folders, .JPEG -----------------------------------------------------
def test_imagenet_sketch_partial_set_with_allow_missing(model, tmp_path, one_template):
    names, templates = IC.names("en"), IC.templates("en")
    order = IC.wnids()
    placed = place(steered(model, tmp_path, names, templates, ".JPEG", extra=30, fixed=[]), tmp_path / "sketch",
                   order.__getitem__)
    with pytest.raises(FlameError, match=r"imagenet-sketch: \d+ of 1000 classes are missing"):
        read_benchmark("imagenet-sketch", tmp_path, OPTS)
    [result] = run_benchmark("imagenet-sketch", model, tmp_path / "sketch", ALLOW)
    assert result["missing_classes"] == 1000 - len({c for _, c in placed})
    assert result["expected_images"] == 50_889
    check(result, placed, names, templates, "imagenet_sketch")
    same_protocol(result, model, placed, names, templates)


# ---- ImageNet-1k: torchvision's meta.bin + val/<wnid>/, five languages -----------------------------
def imagenet_val(model, tmp_path: Path, language: str = "en") -> tuple[Path, list]:
    names, templates = IC.names(language), IC.templates(language)
    pairs = steered(model, tmp_path, names, templates, ".JPEG", extra=24, fixed=[])
    root = tmp_path / "imagenet1k"
    order = IC.wnids()
    placed = []
    for n, (f, c) in enumerate(pairs, 1):
        dest = root / "val" / order[c] / f"ILSVRC2012_val_{n:08d}.JPEG"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(f, dest)
        placed.append((dest, c))
    meta = ({w: (f"class {i}",) for i, w in enumerate(order)}, [order[c] for _, c in placed])
    torch.save(meta, root / "meta.bin")
    return root, placed


def test_imagenet1k_torchvision_layout(model, tmp_path, one_template, monkeypatch):
    root, placed = imagenet_val(model, tmp_path)
    monkeypatch.setitem(IN.TOTALS, "imagenet1k", len(placed))
    [result] = run_benchmark("imagenet1k", model, root, OPTS)
    names, templates = IC.names("en"), IC.templates("en")
    check(result, placed, names, templates, "imagenet1k")
    same_protocol(result, model, placed, names, templates)
    gone = placed[5][0]
    gone.unlink()
    with pytest.raises(FlameError, match=rf"imagenet1k: 1 of {len(placed)} images are missing \(.*{gone.name}\)"):
        read_benchmark("imagenet1k", root, OPTS)


def test_imagenet1k_in_five_languages(model, tmp_path, one_template, monkeypatch):
    root, placed = imagenet_val(model, tmp_path, "jp")
    monkeypatch.setitem(IN.TOTALS, "imagenet1k", len(placed))
    results = run_benchmark("imagenet1k-multilingual", model, root, OPTS)
    assert [r["language"] for r in results] == ["ar", "cn", "en", "it", "jp"]
    for r in results:
        names, templates = IC.names(r["language"]), IC.templates(r["language"])
        check(r, placed, names, templates, "imagenet1k", r["language"])
        same_protocol(r, model, placed, names, templates)
    assert 0 < results[-1]["metrics"]["acc1"] < 1  # steered on the jp names
    picked = run_benchmark("imagenet1k", model, root, Options(workers=0, progress=False, languages=("jp", "it")))
    assert [(r["language"], r["metrics"]) for r in picked] == [(r["language"], r["metrics"]) for r in results[::-1][:2]]


def test_the_package_files_are_what_is_evaluated(tmp_path):
    """Every language's 1000 names and all its templates, as clip-benchmark's json files hold them."""
    order = IC.wnids()
    write_image(tmp_path / "val" / order[0] / "ILSVRC2012_val_00000001.JPEG", 1)
    torch.save(({w: (w,) for w in order}, [order[0]]), tmp_path / "meta.bin")
    data = read_benchmark("imagenet1k-multilingual", tmp_path, ALLOW)
    folder = package_dir()
    counts = {}
    for lang, (names, templates) in data.texts.items():
        assert names == json.loads((folder / f"{lang}_classnames.json").read_text("utf-8"))["imagenet1k"]
        shipped = json.loads((folder / f"{lang}_zeroshot_classification_templates.json").read_text("utf-8"))
        assert templates == shipped["imagenet1k"]
        counts[lang] = len(templates)
    assert counts == {"ar": 55, "cn": 80, "en": 80, "it": 49, "jp": 37}
    assert data.record == {"expected_images": 50_000}
    assert [it.label for it in data.items] == [0]


# ---- ObjectNet: 113 mapped folders, names lowercased -----------------------------------------------
def test_objectnet_mapped_folders_only(model, tmp_path, few_templates):
    labels = {"alarm_clock": "Alarm clock", "banana": "Banana", "zebra_toy": "Toy Zebra", "chair": "Chair",
              "tv": "TV", "dish_soap": "Dish soap", "unmapped_thing": "Unmapped thing"}
    mapped = {"Alarm clock": "analog clock", "Banana": "banana", "Toy Zebra": "zebra", "Chair": "folding chair",
              "TV": "television; monitor", "Dish soap": "soap dispenser"}
    base = tmp_path / "objectnet-1.0"
    (tmp_path / "folder_to_objectnet_label.json").write_text(json.dumps(labels))
    (tmp_path / "objectnet_to_imagenet_1k.json").write_text(json.dumps(mapped))
    # the other two mapping files, which only clip-benchmark's reader needs
    inet = sorted({n for v in mapped.values() for n in v.split("; ")})
    (tmp_path / "imagenet_to_label_2012_v2").write_text("".join(f"{n}\n" for n in inet))
    (tmp_path / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(i): i for i in range(len(inet))}))
    folders = sorted(k for k, v in labels.items() if v in mapped)
    names = [labels[f].lower() for f in folders]
    templates = IC.templates("en")
    pairs = steered(model, tmp_path, names, templates, ".png", extra=9, fmt="PNG")
    placed = place(pairs, base / "images", folders.__getitem__)
    write_image(base / "images" / "unmapped_thing" / "x.png", 5, "PNG")
    [result] = run_benchmark("objectnet", model, tmp_path, OPTS)
    check(result, placed, names, templates, "objectnet")
    same_protocol(result, model, placed, names, templates)
    from clip_benchmark.datasets.objectnet import ObjectNetDataset

    ref = ObjectNetDataset(root=str(tmp_path), transform=None)
    assert ref.classes == names
    assert sorted((Path(p).name, ref.label_map[Path(p).parent.name]) for p, _ in ref.samples) == sorted(
        (f.name, c) for f, c in placed)


# ---- CLIP_benchmark's wds layout ----------------------------------------------------------------
def write_wds(root: Path, pairs, names: list[str], templates: list[str]) -> Path:
    import tarfile

    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tf:
        for i, (f, c) in enumerate(pairs):
            add_member(tf, f"s{i:04d}.jpg", f.read_bytes())
            add_member(tf, f"s{i:04d}.cls", str(c).encode())
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def test_the_wds_layout_is_read_with_its_own_names_and_templates(model, tmp_path):
    names = [f"thing {i}" for i in range(200)]
    templates = ["a photo of a {c}.", "art of the {c}."]
    pairs = steered(model, tmp_path, names, templates, ".jpg", extra=12, fixed=[])
    root = write_wds(tmp_path / "wds_imagenet-a", pairs, names, templates)
    [result] = run_benchmark("imagenet-a", model, tmp_path, OPTS)  # ROOT holding wds_imagenet-a
    assert result["layout"] == "wds"
    check(result, pairs, names, templates, "wds/imagenet-a")
    same_protocol(result, model, pairs, names, templates)
    (root / "classnames.txt").write_text("\n".join(names + ["one more"]) + "\n")
    with pytest.raises(FlameError, match="is not imagenet-a: expected 200 class names in its classnames.txt, not 201"):
        read_benchmark("imagenet-a", root, OPTS)


def test_classes_with_one_name_tie_and_the_ties_are_counted(model, tmp_path):
    """One name, one vector: an image whose top class has a twin is decided by torch.topk, not by
    the model. ImageNet's English names repeat two (so do the other languages')."""
    counts = Counter(IC.names("en"))
    assert {n for n, k in counts.items() if k > 1} == {"missile", "sunglasses"}
    names = [f"thing {i // 2}" for i in range(200)]  # every class has a twin
    templates = ["a photo of a {c}."]
    pairs = steered(model, tmp_path, names, templates, ".jpg", extra=9, fixed=[])
    write_wds(tmp_path / "wds_imagenet-a", pairs, names, templates)
    [result] = run_benchmark("imagenet-a", model, tmp_path, OPTS)
    assert result["ties"] == len(pairs)
    same_protocol(result, model, pairs, names, templates)


# ---- bad input: one line, exit 2 ------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("imagenet1k", "meta.bin and val/<wnid>/"), ("imagenetv2", "ImageNetV2-matched-frequency/<0..999>/"),
    ("imagenet-a", "imagenet-a/<wnid>/: the 200 wnid folders"), ("imagenet-r", "imagenet-r/<wnid>/"),
    ("imagenet-sketch", "sketch/<wnid>/: the 1000 wnid folders"), ("objectnet", "objectnet-1.0/images/<folder>/"),
])
def test_a_root_that_is_not_the_benchmark_says_what_was_expected(tiny, capsys, tmp_path, name, expected):
    write_image(tmp_path / "photos" / "cat" / "1.jpg", 1)
    r = run_flame(capsys, "eval", "--benchmark", name, "--dataset", tmp_path, "--model", tiny[0], "--no-progress")
    assert r.code == 2
    assert f"{tmp_path} is not {name}: expected" in r.error and expected in r.error


def test_imagenet_tars_are_refused_with_the_command_that_unpacks_them(tmp_path):
    (tmp_path / IN.DEVKIT).write_bytes(b"x")
    (tmp_path / IN.VAL_TAR).write_bytes(b"x")
    with pytest.raises(FlameError, match=r"from torchvision.datasets import ImageNet; ImageNet\('.*', split='val'\)"):
        read_benchmark("imagenet1k", tmp_path, OPTS)


def test_bad_languages_and_meta_files(tmp_path):
    with pytest.raises(FlameError, match=r"no class names in language 'zh'; the languages are ar, cn, en, it, jp "
                                         r"\(CLIP_benchmark's code for it is 'cn'\)"):
        read_benchmark("imagenet1k", tmp_path, Options(languages=("zh",)))
    with pytest.raises(FlameError, match="imagenet-r is evaluated in en only"):
        read_benchmark("imagenet-r", tmp_path, Options(languages=("it",)))
    (tmp_path / "val").mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save(Evil(), tmp_path / "meta.bin")
    with pytest.raises(FlameError, match="refused to load ImageNet meta file"):
        read_benchmark("imagenet1k", tmp_path, OPTS)
    torch.save({"not": "a pair"}, tmp_path / "meta.bin")
    with pytest.raises(FlameError, match="is not torchvision's ImageNet meta file"):
        read_benchmark("imagenet1k", tmp_path, OPTS)


def test_the_command_exits_2_with_one_line(tiny, tmp_path):
    """The installed command in a subprocess: a missing ImageNet image, refused before the model loads."""
    order = IC.wnids()
    torch.save(({w: (w,) for w in order}, [order[0]] * 2), tmp_path / "meta.bin")
    write_image(tmp_path / "val" / order[0] / "ILSVRC2012_val_00000001.JPEG", 1)
    p = subprocess.run([sys.executable, "-m", "flame", "eval", "--benchmark", "imagenet1k", "--dataset", str(tmp_path),
                        "--model", str(tiny[0]), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "imagenet1k: 1 of 2 images are missing" in lines[0] and "ILSVRC2012_val_00000002.JPEG" in lines[0]


def test_wds_imagenet1k_in_other_languages_takes_the_package_names(tmp_path):
    import tarfile

    root = tmp_path / "wds_imagenet1k"
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tf:
        for i, c in enumerate((0, 999)):
            add_member(tf, f"s{i}.jpg", image_bytes(i))
            add_member(tf, f"s{i}.cls", str(c).encode())
    (root / "test" / "nshards.txt").write_text("1\n")
    own = [f"own name {i}" for i in range(1000)]
    (root / "classnames.txt").write_text("\n".join(own) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    data = read_benchmark("imagenet1k-multilingual", tmp_path, Options(languages=("en", "jp")))
    assert (data.name, data.format, [it.label for it in data.items]) == ("wds/imagenet1k", "wds", [0, 999])
    assert data.texts["en"] == (own, ["a photo of a {c}."])  # the set's own files, as CLIP_benchmark reads wds
    assert data.texts["jp"] == (IC.names("jp"), IC.templates("jp"))
