"""flame eval end to end: a model trained briefly on generated shapes (text side = the tiny LLM
through `flame embed`), evaluated on generated datasets in the three formats; text cache, the
in-training hook, and every bad-input case (one line, exit 2)."""

from __future__ import annotations

import csv
import gc
import io
import json
from pathlib import Path

import pytest
from support.commands import one_line, run_flame
from support.evalsets import colour_word_llm

from flame.cli import main as flame_main
from flame.data.synthetic import COLORS, combos, sample

COLOR_NAMES = list(COLORS)  # 6 classes: chance 1/6
POOL = combos(shapes=["circle"], positions=["center"])  # 6 captions "a red circle in the center"
TEMPLATES = ["a {c} circle in the center", "a photo of a {c} circle."]
TINY = ["--tower", "vit-tiny", "--image-size", "32", "--proj-hidden", "64", "--no-progress", "--no-tensorboard"]


# ---------------------------------------------------------------------------------------------
# generated evaluation sets in the three formats
# ---------------------------------------------------------------------------------------------
def _samples(n: int, seed: int):
    return [sample(i, seed, 40, POOL) for i in range(n)]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_wds(root: Path, kind: str, n: int = 48, seed: int = 11, train: int = 0) -> Path:
    """CLIP_benchmark's layout: SPLIT/nshards.txt + SPLIT/{0..}.tar; classnames/templates/dataset_type at the root."""
    import webdataset as wds

    root.mkdir(parents=True)
    for split, count, s in (("test", n, seed), ("train", train, seed + 100)):
        if not count:
            continue
        (root / split).mkdir()
        data = _samples(count, s)
        shards = [data[: count // 2], data[count // 2:]]
        for j, part in enumerate(shards):
            with wds.TarWriter(str(root / split / f"{j}.tar")) as sink:
                for i, (img, combo) in enumerate(part):
                    rec = {"__key__": f"s{j}{i:06d}"}
                    if i % 2:  # both image types the published sets use
                        buf = io.BytesIO()
                        img.save(buf, format="WEBP")
                        rec["webp"] = buf.getvalue()
                    else:
                        rec["png"] = _png(img)
                    if kind == "retrieval":
                        rec["txt"] = f"{combo.caption}\n{combo.caption}."  # two captions per image
                    else:
                        rec["cls"] = str(COLOR_NAMES.index(combo.color))
                    sink.write(rec)
        (root / split / "nshards.txt").write_text(str(len(shards)))
    if kind == "retrieval":
        (root / "dataset_type.txt").write_text("retrieval\n")
    else:
        (root / "classnames.txt").write_text("\n".join(COLOR_NAMES) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def write_folder(root: Path, n: int = 48, seed: int = 12, templates: bool = True, broken: int = 0) -> Path:
    for i, (img, combo) in enumerate(_samples(n, seed)):
        d = root / combo.color
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:04d}.png")
    for j in range(broken):
        (root / "red" / f"broken{j}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def write_table(root: Path, fmt: str, n: int = 48, seed: int = 13) -> Path:
    (root / "img").mkdir(parents=True)
    rows = []
    for i, (img, combo) in enumerate(_samples(n, seed)):
        img.save(root / "img" / f"{i}.jpg", quality=95)
        rows.append((f"img/{i}.jpg", combo.caption))
    if fmt == "csv":  # repeated rows = several captions per image
        path = root / "captions.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            for image, cap in rows:
                w.writerow([image, cap])
                w.writerow([image, cap + "."])
    else:  # a list column, and a language column
        path = root / "captions.jsonl"
        lines = [{"image": image, "captions": [cap, cap + "."], "language": "en"} for image, cap in rows]
        lines.append({"image": rows[0][0], "captions": ["un cercle rouge"], "language": "fr"})
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


# ---------------------------------------------------------------------------------------------
# a briefly trained model whose text side is the tiny LLM
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("flame-cache")
    mp.setenv("FLAME_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llm_dir, cache):
    from flame.data.synthetic import write_shards

    root = tmp_path_factory.mktemp("e2e")
    llm = colour_word_llm(tiny_llm_dir, root / "llm")
    write_shards(root / "shards", 512, shard_size=256, size=40, seed=1, pool=POOL)
    assert flame_main(["embed", "--data", str(root / "shards"), "--prompts", "raw=txt", "--llm", str(llm),
                       "--out", str(root / "store")]) == 0
    assert flame_main(["train", "--data", str(root / "shards"), "--embeddings", str(root / "store"), "--out",
                       str(root / "run"), *TINY, "--batch-size", "32", "--steps", "100", "--warmup", "5", "--lr",
                       "2e-3", "--weight-decay", "0", "--workers", "1", "--save-every", "100"]) == 0
    sets = root / "sets"
    write_wds(sets / "wds_shapes", "classification", train=48)
    write_wds(sets / "wds_shapes_captions", "retrieval")
    write_folder(sets / "shape_folders")
    write_table(sets / "csv", "csv")
    write_table(sets / "jsonl", "jsonl")
    return root


def _eval(capsys, *args):
    return run_flame(capsys, "eval", *args)


# (dataset, task, metric, chance). Retrieval: 48 images, 2 captions each, 6 distinct caption texts, so
# R@10 is the informative recall (R@1 cannot exceed ~1/8 when 8 images share a caption).
CASES = [
    ("wds_shapes", "zeroshot-classification", "acc1", 1 / 6),
    ("shape_folders", "zeroshot-classification", "acc1", 1 / 6),
    ("wds_shapes", "linear-probe", "lp_acc1", 1 / 6),
    ("shape_folders", "linear-probe", "lp_acc1", 1 / 6),
    ("wds_shapes_captions", "retrieval", "image_retrieval_recall@10", 10 / 48),
    ("csv/captions.csv", "retrieval", "text_retrieval_recall@10", 1 - (86 * 85) / (96 * 95)),
    ("jsonl", "retrieval", "image_retrieval_recall@10", 10 / 48),
]


@pytest.mark.slow
@pytest.mark.parametrize("dataset,task,metric,chance", CASES)
def test_eval_each_task_and_format_above_chance(trained, capsys, tmp_path, dataset, task, metric, chance):
    out_file = tmp_path / "r.json"
    extra = ["--language", "en"] if dataset == "jsonl" else []  # its language column also has a French row
    code, out, err = _eval(capsys, "--model", trained / "run", "--task", task, "--dataset",
                           trained / "sets" / dataset, "--output", out_file, "--workers", "1", "--no-progress", *extra)
    assert code == 0, err
    r = json.loads(out_file.read_text())
    assert {"dataset", "model", "task", "language", "metrics"} <= set(r)
    assert r["task"] == {"retrieval": "zeroshot_retrieval"}.get(task, task.replace("-", "_"))
    assert r["language"] == "en" and r["skipped_images"] == 0
    if task == "retrieval":
        assert set(r["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
        assert r["prompts"] == "raw"  # short captions, and the store has only the raw set
    elif task == "linear-probe":
        assert set(r["metrics"]) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay"}
    else:
        assert set(r["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    print(f"{dataset} {task}: {metric} {r['metrics'][metric]:.3f} (chance {chance:.3f})")
    assert r["metrics"][metric] >= 2 * chance, r["metrics"]
    assert metric in out and "dataset" in out  # the console table


@pytest.mark.slow
def test_second_evaluation_never_loads_the_llm(trained, capsys, tmp_path, monkeypatch):
    import flame.llm

    monkeypatch.setenv("FLAME_CACHE", str(tmp_path / "fresh-cache"))  # cold text cache
    calls = []
    real = flame.llm.load_llm
    monkeypatch.setattr(flame.llm, "load_llm", lambda *a, **k: calls.append(a) or real(*a, **k))
    args = ("--model", trained / "run", "--dataset", trained / "sets" / "wds_shapes", "--workers", "0", "--no-progress",
            "--output", tmp_path / "a.json")
    code, _, err = _eval(capsys, *args)
    assert code == 0, err
    assert len(calls) == 1  # the first evaluation had to encode the class prompts

    def refuse(*a, **k):
        raise AssertionError("the LLM was loaded although every text is cached")

    monkeypatch.setattr(flame.llm, "load_llm", refuse)
    # the image vectors are cached too: the second evaluation decodes no image
    import flame.evaluate.images

    assert list((tmp_path / "fresh-cache" / "images").glob("*.pt"))
    monkeypatch.setattr(flame.evaluate.images, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    code, _, err = _eval(capsys, *args[:-1], tmp_path / "b.json")
    assert code == 0, err
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["metrics"] == b["metrics"]


@pytest.mark.slow
def test_suite_and_prepare(trained, capsys, tmp_path, monkeypatch):
    import flame.llm

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"- {{dataset: {trained / 'sets' / 'wds_shapes'}, task: zeroshot-classification, name: shapes}}\n"
        f"- {{dataset: {trained / 'sets' / 'jsonl'}, task: retrieval, language: en}}\n"
    )
    monkeypatch.setenv("FLAME_CACHE", str(tmp_path / "cache"))
    calls = []
    real = flame.llm.load_llm
    monkeypatch.setattr(flame.llm, "load_llm", lambda *a, **k: calls.append(a) or real(*a, **k))
    code, out, err = _eval(capsys, "--prepare", "--suite", suite, "--embeddings", trained / "store", "--no-progress")
    assert code == 0, err
    assert len(calls) == 1 and "12 texts (raw), 12 newly encoded" in out  # 6 classes x 2 templates
    monkeypatch.setattr(flame.llm, "load_llm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("LLM loaded")))
    code, out, err = _eval(capsys, "--model", trained / "run", "--suite", suite, "--output", tmp_path / "s.json",
                           "--workers", "0", "--no-progress")
    assert code == 0, err
    results = json.loads((tmp_path / "s.json").read_text())
    assert [r["name"] for r in results] == ["shapes", "jsonl-en"]
    assert results[1]["captions"] == 96  # the French row is left out


@pytest.mark.slow
def test_training_evaluates_without_the_llm_in_memory(trained, tmp_path, monkeypatch):
    import flame.llm
    from flame.evaluate.during import TrainEvaluator
    from flame.loss import MultiPositiveSigmoidLoss

    monkeypatch.setenv("FLAME_CACHE", str(tmp_path / "cache"))  # cold: the hook must encode, then free the LLM
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"- dataset: {trained / 'sets' / 'wds_shapes'}\n  name: shapes\n")
    loads = []
    real = flame.llm.load_llm
    monkeypatch.setattr(flame.llm, "load_llm", lambda *a, **k: loads.append(a) or real(*a, **k))

    def llms_alive() -> int:
        from transformers import PreTrainedModel

        gc.collect()
        return sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())

    before = llms_alive()  # models other tests may have left behind (normally 0)
    seen = {"steps": [], "evals": []}
    rows = MultiPositiveSigmoidLoss.rows  # a micro-batch's loss, on every path of the step

    def checked_rows(self, *a, **k):
        seen["steps"].append(llms_alive())
        return rows(self, *a, **k)

    evaluate = TrainEvaluator.evaluate

    def checked_evaluate(self, model):
        seen["evals"].append((llms_alive(), self.encoder.llm_loaded))
        return evaluate(self, model)

    monkeypatch.setattr(MultiPositiveSigmoidLoss, "rows", checked_rows)
    monkeypatch.setattr(TrainEvaluator, "evaluate", checked_evaluate)
    out = tmp_path / "run"
    with_tensorboard = [a for a in TINY if a != "--no-tensorboard"]
    code = flame_main(["train", "--data", str(trained / "shards"), "--embeddings", str(trained / "store"), "--out",
                       str(out), *with_tensorboard, "--batch-size", "16", "--steps", "7", "--workers", "0", "--eval",
                       str(suite), "--eval-every", "3"])
    assert code == 0
    assert len(loads) == 1  # the class prompts were encoded before training
    assert seen["steps"] == [before] * 7 and seen["evals"] == [(before, False)] * 3
    records = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/shapes/acc1" in r]
    assert [r["step"] for r in evals] == [3, 6, 7]
    assert all({"eval/shapes/acc5", "eval/shapes/mean_per_class_recall"} <= set(r) for r in evals)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/shapes/acc1")] == [3, 6, 7]
    logged = [r["eval/shapes/acc1"] for r in evals]
    assert [e.value for e in events.Scalars("eval/shapes/acc1")] == pytest.approx(logged)
    assert "train/loss" in events.Tags()["scalars"]


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_unreadable_image_is_skipped_and_counted(trained, capsys, tmp_path):
    write_folder(tmp_path / "withbroken", n=24, broken=2)
    code, out, err = _eval(capsys, "--model", trained / "run", "--dataset", tmp_path / "withbroken", "--output",
                           tmp_path / "r.json", "--workers", "0", "--no-progress")
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["skipped_images"] == 2 and r["images"] == 26
    assert "skipped images" in out


def test_dataset_in_no_format_names_the_three(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    code, _, err = _eval(capsys, "--model", tmp_path, "--dataset", tmp_path / "junk")
    line = one_line(err)
    assert code == 2
    assert "webdataset layout" in line and "one sub-folder per class" in line and "CSV/JSONL" in line


def test_dataset_errors_before_model_or_llm(tmp_path, capsys):
    from flame.errors import FlameError
    from flame.evaluate import load_dataset

    write_folder(tmp_path / "notemplates", n=12, templates=False)
    ds = load_dataset(tmp_path / "notemplates")
    from flame.evaluate.tasks import class_prompts

    with pytest.raises(FlameError, match="class names but no zero-shot templates"):
        class_prompts(ds)
    with pytest.raises(FlameError, match=r"ships class names in ar, cn, en, it, jp"):
        load_dataset(tmp_path / "notemplates", language="de")
    with pytest.raises(FlameError, match=r"no 'it' class names for dataset 'notemplates' \(it has them for imagenet1k"):
        load_dataset(tmp_path / "notemplates", language="it")
    # the shipped Italian ImageNet names and templates, by dataset name
    wds = tmp_path / "wds_imagenet1k"
    (wds / "test").mkdir(parents=True)
    (wds / "test" / "nshards.txt").write_text("0")
    ds = load_dataset(wds, language="it")
    assert ds.name == "imagenet1k" and len(ds.classnames) == 1000 and ds.classnames[1] == "un pesce rosso"
    assert ds.templates[0] == "una brutta foto di {c}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_templates", "language", "not_checkpoint", "fingerprint"])
def test_bad_input_one_line_exit_2(case, trained, capsys, tmp_path, tiny_llm_dir):
    model, dataset, extra = trained / "run", trained / "sets" / "wds_shapes", []
    if case == "no_templates":
        dataset = write_folder(tmp_path / "plain", n=12, templates=False)
        expect = "class names but no zero-shot templates"
    elif case == "language":
        extra, expect = ["--language", "xx"], "the clip-benchmark package ships class names in ar, cn, en, it, jp"
    elif case == "not_checkpoint":
        (tmp_path / "nothing").mkdir()
        model, expect = tmp_path / "nothing", "is not a FLAME model"
    else:  # the tiny LLM before rewiring: same architecture and tokenizer, other weights
        extra, expect = ["--llm", tiny_llm_dir], "weight fingerprint"
        dataset = write_folder(tmp_path / "plain", n=12, templates=False)  # new prompts: not cached
        (dataset / "zeroshot_classification_templates.txt").write_text("a picture of something {c}\n")
    code, _, err = _eval(capsys, "--model", model, "--dataset", dataset, "--workers", "0", "--no-progress", *extra)
    line = one_line(err)
    assert code == 2 and expect in line, line
    if case == "fingerprint":  # forcing it is allowed
        code, _, err = _eval(capsys, "--model", model, "--dataset", dataset, "--workers", "0", "--no-progress",
                             *extra, "--force-llm")
        assert code == 0, err


def test_default_prompt_sets_follow_caption_length_language_and_the_trained_sets(tmp_path):
    """FLAME.md section 6: class prompts and short captions -> raw; long English captions -> long,
    if the model was trained with a long set."""
    from flame.evaluate.datasets import EvalDataset, Item
    from flame.evaluate.tasks import LONG_WORDS, default_prompts

    def ds(words: int, language: str = "en") -> EvalDataset:
        return EvalDataset(tmp_path, "x", "table", "retrieval", {"test": [Item(captions=["w " * words])]},
                           language=language)

    full = {"prompt_sets": [{"name": "raw"}, {"name": "short"}, {"name": "long"}]}
    assert default_prompts("zeroshot_retrieval", ds(LONG_WORDS + 20), full) == "long"
    assert default_prompts("zeroshot_retrieval", ds(LONG_WORDS - 1), full) == "raw"
    assert default_prompts("zeroshot_retrieval", ds(LONG_WORDS + 20, "de"), full) == "raw"
    assert default_prompts("zeroshot_retrieval", ds(LONG_WORDS + 20), {"prompt_sets": [{"name": "raw"}]}) == "raw"
    assert default_prompts("zeroshot_classification", ds(50), full) == "raw"


def test_table_languages_and_caption_lists(tmp_path):
    from flame.errors import FlameError
    from flame.evaluate import load_dataset

    path = write_table(tmp_path / "t", "jsonl", n=4)
    assert load_dataset(path).language == "all"
    en = load_dataset(path, language="en")
    assert len(en.items()) == 4 and all(len(it.captions) == 2 for it in en.items())
    fr = load_dataset(path, language="fr")
    assert [it.captions for it in fr.items()] == [["un cercle rouge"]]
    with pytest.raises(FlameError, match=r"no captions in language 'de' \(it has en, fr\)"):
        load_dataset(path, language="de")
    csv_ds = load_dataset(write_table(tmp_path / "c", "csv", n=4))  # repeated rows -> several captions
    assert [len(it.captions) for it in csv_ds.items()] == [2, 2, 2, 2] and csv_ds.language == "en"
