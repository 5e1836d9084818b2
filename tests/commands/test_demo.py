"""`flame demo --quick` end to end: generated data -> flame embed (built-in SmolLM2) -> flame train ->
CLIP baseline -> flame.evaluate -> metrics.json / report.md / plots; a second run reuses everything."""

from __future__ import annotations

import json

import pytest

from flame.cli import main as flame_main

RETRIEVAL = ("test", "compositional", "paraphrase", "multilingual", "multilingual-fr", "multilingual-de",
             "multilingual-es")
R_KEYS = {"i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "chance_r1"}


@pytest.mark.parametrize(("line", "expected"), [("steps: abc", "--steps (steps): expected a whole number, got 'abc'"),
                                                ("steps: 0", "--steps must be >= 1 (got 0)")])
def test_bad_config_file_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, line, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"out: {tmp_path / 'demo'}\nquick: yes\n{line}\n")
    assert flame_main(["demo", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "demo").exists()  # nothing was made


def test_help_shows_the_defaults_of_the_config_dataclass(capsys):
    from flame.demo import Config, DemoSettings

    with pytest.raises(SystemExit) as stop:
        flame_main(["demo", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"output folder (default {Config().out})" in text
    assert f"(default {DemoSettings.llm}, built in)" in text and "(default -2)" in text and "(default 0)" in text
    assert f"(default {DemoSettings.steps}; --quick 120)" in text
    assert "--no-progress" in text and "--config FILE" in text


def test_report_is_written_from_the_result_object_alone(tmp_path):
    from flame.demo.facts import MODELS, SPLITS, DemoPaths, DemoResult
    from flame.demo.report import report_text
    from flame.demo.settings import DemoSettings

    r = {"i2t_r1": 0.5, "t2i_r1": 0.25, "i2t_r5": 0.75, "t2i_r5": 1.0, "chance_r1": 0.125, "chance_r5": 0.5}
    zeroshot = {"top1": 0.3, "top5": 0.6, "chance": 0.1}
    metrics = {m: {**{s: r for s in (*SPLITS, "multilingual")}, "zeroshot": zeroshot} for m in MODELS}
    result = DemoResult(settings=DemoSettings(), paths=DemoPaths(tmp_path), metrics=metrics,
                        timings={"data": 1.0, "total": 60.0}, skipped=["data"],
                        llm={"dtype": "bfloat16", "float32": 100.0, "bfloat16": 200.0}, machine="a test machine",
                        date="2026-01-01 00:00 UTC")
    text = report_text(result)
    assert "2026-01-01 00:00 UTC · a test machine · total 1.0 min (data 1 s (cached), total 60 s)" in text
    assert "| test | 0.500 | 0.250 | 0.500 | 0.250 |" in text and "zero-shot top-1 | 0.300" in text
    assert "LLM dtype bfloat16" in text and "bf16 200 tok/s" in text


@pytest.mark.slow
def test_demo_quick_end_to_end_and_cached_rerun(tmp_path, flame_cache, capsys):
    out = tmp_path / "demo"
    assert flame_main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    first = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())

    # the documented shape: {model: {split: {metric: value}}}
    assert set(metrics) == {"flame", "clip"}
    for model in metrics.values():
        assert set(RETRIEVAL) | {"zeroshot"} <= set(model)
        for split in RETRIEVAL:
            assert R_KEYS <= set(model[split]), split
            assert all(0.0 <= model[split][k] <= 1.0 for k in R_KEYS)
        assert {"top1", "chance"} <= set(model["zeroshot"])

    # FLAME learned: above chance in distribution, both directions, and on zero-shot classes
    f = metrics["flame"]
    assert f["test"]["i2t_r1"] > 2 * f["test"]["chance_r1"]
    assert f["test"]["t2i_r1"] > 2 * f["test"]["chance_r1"]
    assert f["paraphrase"]["i2t_r5"] > f["paraphrase"]["chance_r5"]  # words no training caption used
    assert metrics["clip"]["test"]["i2t_r5"] > metrics["clip"]["test"]["chance_r5"]
    # zero-shot is reported, not asserted: --quick trains 120 steps, far too few to learn the shapes (the full
    # demo's 2,000 steps reach 3x chance; README "What the demo found")
    assert 0.0 <= f["zeroshot"]["top1"] <= 1.0 and f["zeroshot"]["chance"] == pytest.approx(0.1)

    report = (out / "report.md").read_text()
    assert "| test |" in report and "zero-shot top-1" in report
    assert f"{f['test']['i2t_r1']:.3f}" in report  # the table shows the measured numbers
    for png in ("loss.png", "recall.png", "queries.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    for stage in ("[1/7] data", "[3/7] embed", "[4/7] train", "[5/7] clip", "[6/7] eval", "left)"):
        assert stage in first

    # second run: every stage before evaluation is cached, the numbers are identical
    assert flame_main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    second = capsys.readouterr().out
    for stage in ("data", "embed", "train", "clip"):
        assert f"{stage}: cached, skipped" in second
    assert json.loads((out / "metrics.json").read_text()) == metrics
