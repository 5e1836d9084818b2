"""`flame eval --suite paper --data-root DIR`: the benchmarks found under DIR in their distributed
folder names run with one model load, absent ones skipped in one line each, and the report (JSON,
Markdown, plot) holds the paper's tables with the published rows and this model's row, read from
the benchmarks' own results; bad input is one line, exit 2, before any model is loaded."""

from __future__ import annotations

import json
import shutil

import pytest
from support.commands import run_flame
from support.compositional import sugarcrepe_root, winoground_root

from flame.evaluate.benchmark import names
from flame.evaluate.benchmark.published import TABLES


@pytest.fixture(scope="module")
def folder(eval_model_dir):
    return eval_model_dir


def _suite(capsys, folder, root, *args):
    return run_flame(capsys, "eval", "--suite", "paper", "--data-root", root, "--model", folder, "--workers", "0",
                     "--no-progress", *args)


def _table(report: dict, title_start: str) -> dict:
    return next(t for t in report["tables"] if t["title"].startswith(title_start))


def test_paper_suite_tables_hold_the_published_rows_and_this_models_results(folder, capsys, tmp_path):
    data = tmp_path / "data"
    sugarcrepe_root(data / "sugar-crepe")
    winoground_root(data / "winoground")
    out = tmp_path / "report" / "paper.json"
    r = _suite(capsys, folder, data, "--output", out)
    assert r.code == 0, r.err
    report = json.loads(out.read_text())
    assert report["ran"] == ["sugarcrepe", "winoground"]
    assert [x["benchmark"] for x in report["skipped"]] == [n for n in names() if n not in report["ran"]]
    assert [t["title"] for t in report["tables"]] == [t.title for t in TABLES]
    by = {x["dataset"]: x for x in report["results"]}

    sugar = _table(report, "SugarCrepe")
    *published, mine = sugar["rows"]
    assert [p["values"] for p in published] == [list(r.values) for r in TABLES[4].rows]
    assert published[0]["values"][:3] == [90.92, 80.08, 69.20]  # OpenAI CLIP B/32, replace-obj/att/rel
    order = ["replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att",
             "replace", "swap", "add"]
    assert mine["model"] == "this model" and mine["data"] == str(folder)
    assert mine["values"] == [round(100 * by[f"sugar_crepe/{s}"]["metrics"]["acc"], 2) for s in order]
    wino = _table(report, "Winoground")
    assert wino["rows"][0]["values"] == [25.0, 25.0, 16.67]
    assert wino["rows"][-1]["values"] == [round(100 * by["winoground"]["metrics"][k], 2)
                                          for k in ("text_score", "image_score", "group_score")]
    long = _table(report, "Long-caption")  # not run: the published rows, an empty row for this model
    assert long["rows"][2]["model"] == "FLAME" and long["rows"][2]["values"][0] == [85.6, 80.0]
    assert long["rows"][-1]["values"] == [None] * 4
    assert report["other"] == []  # every result of these two has a column

    md = out.with_suffix(".md").read_text()
    cells = " | ".join(f"{v:.2f}"[:-1] if f"{v:.2f}".endswith("0") else f"{v:.2f}" for v in mine["values"])
    assert f"| **this model** | {folder} | {cells} |" in md
    assert "| FLAME | CC3M | 85.6 / 80.0 | 65.3 / 66.6 | 50.8 / 49.3 | 54.5 / 51.9 |" in md
    assert "| **this model** | " in md.split("## Long-caption")[1].split("##")[0]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.split("\n## ", 1)[1] in r.out  # the same tables printed

    shutil.rmtree(data / "sugar-crepe")  # absent: one line, the rest runs
    r = _suite(capsys, folder, data, "--output", out)
    assert r.code == 0, r.err
    assert "skipped sugarcrepe: no sugar-crepe/ under" in r.out
    assert json.loads(out.read_text())["ran"] == ["winoground"]


def test_paper_suite_bad_input_is_one_line(folder, capsys, tmp_path):
    data = tmp_path / "data"
    (data / "elsewhere").mkdir(parents=True)
    r = _suite(capsys, folder, data)
    assert r.code == 2 and "holds none of the paper's benchmarks" in r.error and "sugar-crepe" in r.error
    (data / "sugar-crepe").mkdir()  # there, but not the benchmark: refused before the model loads
    r = _suite(capsys, folder, data)
    assert r.code == 2 and "is not sugarcrepe: expected val2017/" in r.error
    r = _suite(capsys, folder, data, "--output", tmp_path / "paper.md")  # the Markdown would overwrite it
    assert r.code == 2 and "--output FILE names the JSON" in r.error
    r = run_flame(capsys, "eval", "--suite", "paper", "--model", folder)
    assert r.code == 2 and "--suite paper needs --data-root DIR" in r.error
    r = run_flame(capsys, "eval", "--data-root", data, "--dataset", data, "--model", folder)
    assert r.code == 2 and "--data-root DIR is for --suite paper" in r.error
    r = run_flame(capsys, "eval", "--suite", "paper", "--data-root", data, "--benchmark", "winoground",
                  "--model", folder)
    assert r.code == 2 and "runs on its own" in r.error


def test_report_reads_the_columns_result_and_lists_untabled_benchmarks():
    """No model: a column with `where` reads that result (XM3600's `mean` entry, not a language);
    a benchmark no table has a column for is listed under "Other results"."""
    from flame.evaluate.benchmark import report

    r1 = ("text_retrieval_recall@1", "image_retrieval_recall@1")
    results = {"xm3600": [{"dataset": "xm3600", "language": "de", "metrics": dict(zip(r1, (0.9, 0.9)))},
                          {"dataset": "xm3600", "language": "mean", "metrics": dict(zip(r1, (0.5, 0.25)))}],
               "imagenet1k-it": [{"dataset": "imagenet1k", "language": "it", "metrics": {"acc1": 0.3, "acc5": None}}]}
    rep = json.loads(json.dumps(report.build(results, "M", "D", [])))
    assert _table(rep, "Crossmodal")["rows"][-1]["values"] == [[50.0, 25.0]]
    assert _table(rep, "Short-caption")["rows"][-1]["values"] == [None, None]
    assert rep["other"] == [{"benchmark": "imagenet1k-it", **results["imagenet1k-it"][0]}]
    md = report.markdown(rep)
    assert "| **this model** | M | 50.0 / 25.0 |" in md
    assert "| imagenet1k-it | imagenet1k | it | acc1 | 30.00 |" in md
    assert "| imagenet1k-it | imagenet1k | it | acc5 |  |" in md
